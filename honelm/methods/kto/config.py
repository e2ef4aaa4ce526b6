"""Configuration of Kahneman-Tversky Optimization (KTO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from honelm.diagnostics.codes import normalize_settings

_LOSS_TYPES = ("kto", "apo_zero_unpaired")
_TRUNCATION_MODES = ("keep_start", "keep_end")
# Loss types whose reference point z0 is estimated from mismatched pairs of each batch.
KL_LOSS_TYPES = ("kto",)


@dataclass
class KTOConfig(TrainingArguments):
    """Everything :class:`~honelm.KTOTrainer` needs, on top of ``transformers.TrainingArguments``.

    Defaults that differ from ``TrainingArguments`` (as in TRL's ``KTOConfig``): ``learning_rate=1e-6``,
    ``logging_steps=10``, ``train_sampling_strategy="sequential"``, ``bf16`` on when the accelerator
    supports it (``None`` = decide automatically).
    """

    # ---- Model -------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when `model` is a name or path "
            "(e.g. `{'attn_implementation': 'sdpa'}`). `dtype` defaults to 'auto'."
        },
    )
    ref_model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when the reference model is loaded from a name or "
            "path. Defaults to `model_init_kwargs`."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers that ship their own Python code (passed to `from_pretrained`)."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Switch off dropout in the model and the reference model."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the load-balancing loss of mixture-of-experts models added to the KTO loss. "
            "`None`: the model config's own coefficient; `0.0` turns it off. Only for MoE models."
        },
    )

    # ---- Data preprocessing ------------------------------------------------------------------
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the dataset."}
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Longest prompt + completion, in tokens (also applied to the mismatched KL sequences). "
            "`None` disables truncation."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt, in tokens, applied before `max_length`. `None`: no separate limit."},
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest completion, in tokens (its end is cut), applied before `max_length`. `None`: no "
            "separate limit."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "What overlong rows keep: `keep_start` (cut the end of the completion; a prompt that fills "
            "`max_length` by itself leaves the row empty and it is dropped) or `keep_end` (cut the beginning of "
            "the prompt). Also decides which end of the prompt `max_prompt_length` keeps.",
            "choices": list(_TRUNCATION_MODES),
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Flatten each batch into one row with position ids restarting at every sequence: no padding "
            "tokens, no cross-sequence attention."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad sequence length to a multiple of this value."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of the whole dataset once before training, so that no "
            "reference forward runs during training. The KL pairs are then fixed per chunk of "
            "`per_device_train_batch_size` rows."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the reference pass of `precompute_ref_log_probs`. `None`: "
            "`per_device_train_batch_size` (train) or `per_device_eval_batch_size` (eval)."
        },
    )

    # ---- Training ----------------------------------------------------------------------------
    loss_type: str = field(
        default="kto",
        metadata={
            "help": "`kto` (Ethayarajh et al., 2024: rewards against a KL reference point estimated from "
            "mismatched pairs of the batch) or `apo_zero_unpaired` (D'Oosterlinck et al., 2024: push "
            "desirable rewards up and undesirable ones down, no reference point).",
            "choices": list(_LOSS_TYPES),
        },
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Scale of the implicit reward; higher keeps the model closer to the reference."},
    )
    desirable_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the loss of desirable rows (`label=True`); raise it when they are the minority."
        },
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the loss of undesirable rows (`label=False`); raise it when they are the minority."
        },
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Offload activations to CPU memory during the forward pass."}
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Move the reference model toward the policy every `ref_model_sync_steps` steps (TR-DPO, "
            "Gorbatovski et al., 2024). Needs a separate reference model (no PEFT, no precomputed log-probs)."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "Mix of a reference sync: `ref = alpha * policy + (1 - alpha) * ref`."},
    )
    ref_model_sync_steps: int = field(
        default=512, metadata={"help": "Optimizer steps between two reference syncs."}
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
            "e.g. `{\"KTO_BATCH_TOO_SMALL\": 8, \"LOSS_DIVERGING\": {\"ratio\": 3}}`."
        },
    )
    diagnostics_silence: list[str] | None = field(
        default=None,
        metadata={"help": "Diagnostic codes never to report, e.g. `DATA_PADDING_WASTE SYS_LOW_MEMORY_USE`."},
    )

    # ---- Defaults that differ from TrainingArguments -----------------------------------------
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or fraction)."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Order of the training rows: `sequential` (dataset order, as TRL's KTO), `random`, "
            "`group_by_length` or `batch_rebalance`. The KL pairs are built inside each batch, so every "
            "strategy works; shuffle the dataset when it is sorted by label.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )
    bf16: bool | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "bf16 mixed precision. `None`: on when the accelerator supports bf16 and fp16 is off."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _accelerator_supports_bf16()
        if self.pad_to_multiple_of == "auto":  # TRL's spelling of "no padding" off Neuron devices
            self.pad_to_multiple_of = None
        _check_choice("loss_type", self.loss_type, _LOSS_TYPES)
        _check_choice("truncation_mode", self.truncation_mode, _TRUNCATION_MODES)
        for name in ("max_length", "max_prompt_length", "max_completion_length", "pad_to_multiple_of",
                     "precompute_ref_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"KTOConfig.{name} must be a positive integer or None, got {value!r}.")
        if self.beta <= 0:
            raise ValueError(f"KTOConfig.beta must be positive, got {self.beta}.")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"KTOConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.loss_type in KL_LOSS_TYPES and self.per_device_train_batch_size < 2:
            raise ValueError(
                f"KTOConfig: loss_type={self.loss_type!r} estimates its KL reference point from mismatched "
                "prompt-completion pairs of each batch, which needs at least 2 rows per batch, but "
                f"per_device_train_batch_size={self.per_device_train_batch_size}. Fix: set "
                "per_device_train_batch_size >= 2 (8 or more gives a steadier estimate; lower "
                "gradient_accumulation_steps to keep the same effective batch), or use "
                "loss_type='apo_zero_unpaired', which has no reference point."
            )
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError(
                "KTOConfig: sync_ref_model=True moves the reference model during training, so reference log-probs "
                "computed before training would go stale. Set precompute_ref_log_probs=False or sync_ref_model=False."
            )
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"KTOConfig.ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}.")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"KTOConfig.ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}.")
        normalize_settings(self, "KTOConfig")  # unknown codes, thresholds, levels: clear errors
        super().__post_init__()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"KTOConfig.{name}={value!r} is not supported. Choose one of: {', '.join(choices)}.")


def _accelerator_supports_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
