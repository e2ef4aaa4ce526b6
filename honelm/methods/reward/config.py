"""Configuration of reward modeling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from honelm.diagnostics.codes import normalize_settings


@dataclass
class RewardConfig(TrainingArguments):
    """Everything :class:`~honelm.RewardTrainer` needs, on top of ``transformers.TrainingArguments``.

    Defaults that differ from ``TrainingArguments``: ``learning_rate=1e-4``, ``logging_steps=10``,
    ``bf16`` on when the accelerator supports it (``None`` = decide automatically).
    """

    # ---- Model -------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForSequenceClassification.from_pretrained` when `model` is "
            "a name or path (e.g. `{'attn_implementation': 'sdpa'}`). `num_labels` is always 1; `dtype` defaults "
            "to float32 (the new score head and its optimizer need full precision)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers that ship their own Python code (loading by name only)."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer directory or a Jinja template file whose chat template replaces the "
            "model's. Needed for conversational data when the model has no template."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn off dropout in the model (dropout layers and attention dropout)."},
    )

    # ---- Data preprocessing ------------------------------------------------------------------
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the dataset."}
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token appended to standard (non-chat) completions; defaults to the tokenizer's EOS. "
            "Also set as the tokenizer's EOS."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Padding token; defaults to the tokenizer's pad token, then its EOS."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Longest prompt + completion, in tokens. Pairs whose chosen or rejected sequence is longer "
            "are dropped (not truncated: a cut answer cannot be judged). `None` keeps every pair."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad sequence length to a multiple of this value."}
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Flatten each batch (chosen and rejected sequences) into one row with position ids "
            "restarting at every sequence: no padding tokens, no cross-sequence attention."
        },
    )

    # ---- Training ----------------------------------------------------------------------------
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the term `mean((r_chosen + r_rejected)^2)` that pulls rewards towards zero mean "
            "(Eisenstein et al. 2023, Eq. 2). `None` turns it off; 0.01 is a common value."
        },
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload activations to CPU memory during the forward pass."}
    )

    # ---- Diagnostics -------------------------------------------------------------------------
    diagnostics: bool = field(
        default=True,
        metadata={
            "help": "Watch the run and report recognized problems (before training from the data, then from "
            "the metrics and the machine): on the console, in `output_dir/diagnostics.jsonl` and as "
            "`diagnostics/*` metrics. See docs/diagnostics.md."
        },
    )
    diagnostics_stop_on: Literal["error", "critical"] | None = field(
        default=None,
        metadata={
            "help": "Stop training when a problem of this severity is found (`critical`, or `error` for errors "
            "and critical problems), after saving a checkpoint; found before training, it raises an error. "
            "`None`: report only."
        },
    )
    diagnostics_thresholds: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Per-code thresholds: a number sets the code's main threshold, a mapping sets them by name, "
            "e.g. `{\"REWARD_SCALE_DRIFT\": 10, \"LOSS_DIVERGING\": {\"ratio\": 3}}`."
        },
    )
    diagnostics_silence: list[str] | None = field(
        default=None,
        metadata={"help": "Diagnostic codes never to report, e.g. `DATA_PADDING_WASTE SYS_LOW_MEMORY_USE`."},
    )

    # ---- Defaults that differ from TrainingArguments -----------------------------------------
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or fraction)."})
    bf16: bool | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "bf16 mixed precision. `None`: on when the accelerator supports bf16 and fp16 is off."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _accelerator_supports_bf16()
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"RewardConfig.max_length must be a positive integer or None, got {self.max_length}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"RewardConfig.pad_to_multiple_of must be a positive integer or None, got {self.pad_to_multiple_of}."
            )
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                "RewardConfig.center_rewards_coefficient must be >= 0 (or None to turn centering off), got "
                f"{self.center_rewards_coefficient}."
            )
        normalize_settings(self, "RewardConfig")  # unknown codes, thresholds, levels: clear errors
        super().__post_init__()


def _accelerator_supports_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
