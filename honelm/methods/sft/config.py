"""Configuration of supervised fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from honelm.diagnostics.codes import normalize_settings

_PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
_LOSS_TYPES = ("nll", "dft")
_TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class SFTConfig(TrainingArguments):
    """Everything :class:`~honelm.SFTTrainer` needs, on top of ``transformers.TrainingArguments``.

    Defaults that differ from ``TrainingArguments``: ``learning_rate=2e-5``, ``logging_steps=10``,
    ``bf16`` on when the accelerator supports it (``None`` = decide automatically).
    """

    # ---- Model -------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when `model` is a name or path "
            "(e.g. `{'attn_implementation': 'sdpa'}`). `dtype` defaults to 'auto'."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer directory or a Jinja template file whose chat template replaces the "
            "model's. Needed for conversational data when the model has no template."
        },
    )

    # ---- Data preprocessing ------------------------------------------------------------------
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column holding the text of standard language-modeling data."}
    )
    dataset_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Options of dataset preparation. `{'skip_prepare_dataset': True}` uses the dataset "
            "as given (it must already hold `input_ids`)."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the dataset."}
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token appended to standard (non-chat) texts and completions; defaults to the "
            "tokenizer's EOS. Also set as the tokenizer's EOS."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Padding token; defaults to the tokenizer's pad token, then its EOS."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest tokenized sequence (or packed row). `None` disables truncation."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which part of an overlong sequence is kept: `keep_start` or `keep_end`."},
    )
    shuffle_dataset: bool = field(
        default=False, metadata={"help": "Shuffle the training dataset once before training."}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several sequences into each row of `max_length` tokens (padding-free)."},
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "`bfd` (best-fit decreasing; overlong sequences truncated), `bfd_split` (overflow "
            "split into new pieces) or `wrapped` (concatenate and cut)."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Flatten each batch into one row with position ids restarting at every sequence: "
            "no padding tokens, no cross-sequence attention. Implied by `packing`."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad sequence length to a multiple of this value."}
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval dataset; defaults to `packing`."}
    )

    # ---- Training ----------------------------------------------------------------------------
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train only on completion tokens of prompt-completion data. `None` = on for "
            "prompt-completion data."
        },
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "Train only on assistant turns of conversational data (needs a chat template "
            "with `{% generation %}` markers)."
        },
    )
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "`nll` (negative log-likelihood) or `dft` (Dynamic Fine-Tuning: each token's loss "
            "weighted by its detached probability)."
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
            "e.g. `{\"GRAD_NORM_SPIKE\": 20, \"LOSS_DIVERGING\": {\"ratio\": 3}}`."
        },
    )
    diagnostics_silence: list[str] | None = field(
        default=None,
        metadata={"help": "Diagnostic codes never to report, e.g. `DATA_PADDING_WASTE SYS_LOW_MEMORY_USE`."},
    )

    # ---- Defaults that differ from TrainingArguments -----------------------------------------
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or fraction)."})
    bf16: bool | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "bf16 mixed precision. `None`: on when the accelerator supports bf16 and fp16 is off."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _accelerator_supports_bf16()
        _check_choice("packing_strategy", self.packing_strategy, _PACKING_STRATEGIES)
        _check_choice("loss_type", self.loss_type, _LOSS_TYPES)
        _check_choice("truncation_mode", self.truncation_mode, _TRUNCATION_MODES)
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"SFTConfig.max_length must be a positive integer or None, got {self.max_length}.")
        if self.packing and self.max_length is None:
            raise ValueError("SFTConfig: `packing=True` needs `max_length` (the length of a packed row).")
        normalize_settings(self, "SFTConfig")  # unknown codes, thresholds, levels: clear errors
        super().__post_init__()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SFTConfig.{name}={value!r} is not supported. Choose one of: {', '.join(choices)}.")


def _accelerator_supports_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
