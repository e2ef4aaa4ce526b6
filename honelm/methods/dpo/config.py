"""Configuration of Direct Preference Optimization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from honelm.diagnostics.codes import normalize_settings

from .loss import LOSS_TYPES, _check_combination, _resolve_loss_types

_TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class DPOConfig(TrainingArguments):
    """Everything :class:`~honelm.DPOTrainer` needs, on top of ``transformers.TrainingArguments``.

    Field names and defaults follow TRL's ``DPOConfig``, so a TRL script keeps working when only
    the import changes. Defaults that differ from ``TrainingArguments``: ``learning_rate=1e-6``,
    ``logging_steps=10``, ``bf16`` on when the accelerator supports it (``None`` = decide
    automatically).
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
            "help": "Keyword arguments for `from_pretrained` of the reference model when it is loaded from "
            "the policy's name or path. Defaults to `model_init_kwargs`."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers whose code ships with the checkpoint (`from_pretrained`)."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout of the policy and the reference model to 0."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the load-balancing loss of mixture-of-experts models. `None`: the model "
            "config's own `router_aux_loss_coef`; 0 turns it off."
        },
    )

    # ---- Data preprocessing ------------------------------------------------------------------
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the dataset."}
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Padding token; defaults to the tokenizer's pad token, then its EOS."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt, in tokens: longer prompts keep their last tokens. `None`: no limit."},
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest chosen or rejected completion, in tokens: longer ones keep their first tokens. "
            "`None`: no limit."
        },
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Longest prompt + completion sequence, in tokens (applied after the two limits above). "
            "`None` disables truncation."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "Which part of an overlong sequence is kept: `keep_start` (cut the end of the completions) "
            "or `keep_end` (cut the beginning of the prompt first)."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Flatten each batch (chosen and rejected sequences alike) into one row with position ids "
            "restarting at every sequence: no padding tokens, no cross-sequence attention."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad sequence length to a multiple of this value."}
    )

    # ---- Loss --------------------------------------------------------------------------------
    loss_type: str | list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "DPO loss variant, or a list of variants summed with `loss_weights` (MPO: sigmoid "
            "bco_pair sft). One of: " + ", ".join(LOSS_TYPES) + ". See docs/dpo_losses.md."
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per entry of `loss_type` (default 1.0 each), e.g. `0.8 0.2 1.0` for MPO."},
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "How far the policy may move from the reference (larger: closer). For `ipo` it is the "
            "regularization tau of the paper."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Assumed rate of flipped preference labels: cDPO for `sigmoid`, `sigmoid_norm`, `aot`, "
            "`aot_unpaired`; robust DPO for `robust`; epsilon of `exo_pair` (0 means 1e-3)."
        },
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": "Divergence that keeps the policy near the reference (f-DPO): `reverse_kl` (DPO), "
            "`forward_kl`, `js_divergence` or `alpha_divergence`."
        },
    )
    f_alpha_divergence_coef: float = field(
        default=0.5,
        metadata={
            "help": "alpha of `alpha_divergence`, f'(u) = (1 - u^-alpha) / alpha: -> 0 is reverse KL, 1 is "
            "forward KL."
        },
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={
            "help": "LD-DPO: weight in [0, 1] of the completion tokens beyond the shorter completion of the "
            "pair (policy and reference alike). `None` (or 1): plain sums."
        },
    )
    use_weighting: bool = field(
        default=False,
        metadata={
            "help": "WPO: weight each pair by how likely the current policy is to produce it (length-normalized, "
            "detached)."
        },
    )
    rpo_alpha: float | None = field(
        default=None,
        metadata={"help": "RPO: add this times the per-token NLL of the chosen completion (the paper uses 1.0)."},
    )
    discopop_tau: float = field(
        default=0.05, metadata={"help": "Temperature of the `discopop` loss (the paper's value is 0.05)."}
    )

    # ---- Reference model ---------------------------------------------------------------------
    reference_free: bool = field(
        default=False,
        metadata={
            "help": "No reference model: its log-probs are taken as 0 (a uniform reference), so the loss "
            "compares the policy's own log-probs."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of every pair in one pass before training (dataset columns "
            "`ref_chosen_logps`, `ref_rejected_logps`); no reference model is kept in memory."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of that pass; defaults to `per_device_train_batch_size` (train) and "
            "`per_device_eval_batch_size` (eval)."
        },
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "TR-DPO: every `ref_model_sync_steps` steps, set ref <- alpha * policy + (1 - alpha) * ref. "
            "Needs a separate reference model (not with PEFT or precomputed log-probs)."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "alpha of TR-DPO, in [0, 1]: 1 copies the policy into the reference."}
    )
    ref_model_sync_steps: int = field(
        default=512, metadata={"help": "TR-DPO: optimizer steps between two updates of the reference model."}
    )

    # ---- Training ----------------------------------------------------------------------------
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
            "e.g. `{\"PREF_NO_SIGNAL\": 0.1, \"LOSS_DIVERGING\": {\"ratio\": 3}}`."
        },
    )
    diagnostics_silence: list[str] | None = field(
        default=None,
        metadata={"help": "Diagnostic codes never to report, e.g. `DATA_PADDING_WASTE SYS_LOW_MEMORY_USE`."},
    )

    # ---- Defaults that differ from TrainingArguments -----------------------------------------
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or fraction)."})
    bf16: bool | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "bf16 mixed precision. `None`: on when the accelerator supports bf16 and fp16 is off."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _accelerator_supports_bf16()
        self.loss_type = _loss_type_list(self.loss_type)
        try:
            names, _ = _resolve_loss_types(self.loss_type, self.loss_weights)
            _check_combination(names, self.f_divergence_type, self.label_smoothing)
        except ValueError as e:
            raise ValueError(f"DPOConfig: {e}") from None
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in self.loss_weights]
        self._check_values()
        self._check_reference_options()
        normalize_settings(self, "DPOConfig")  # unknown codes, thresholds, levels: clear errors
        super().__post_init__()

    def _check_values(self) -> None:
        if self.truncation_mode not in _TRUNCATION_MODES:
            raise ValueError(
                f"DPOConfig.truncation_mode={self.truncation_mode!r} is not supported. "
                f"Choose one of: {', '.join(_TRUNCATION_MODES)}."
            )
        for name in ("max_length", "max_prompt_length", "max_completion_length", "precompute_ref_batch_size",
                     "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DPOConfig.{name} must be a positive integer or None, got {value!r}.")
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}. The usual range is 0.01 to 0.5.")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(
                f"DPOConfig.ld_alpha must be in [0, 1] (1 = plain DPO) or None, got {self.ld_alpha}. "
                "The LD-DPO paper uses 0.2 to 0.8."
            )
        if self.f_divergence_type == "alpha_divergence" and not self.f_alpha_divergence_coef > 0:
            raise ValueError(
                f"DPOConfig.f_alpha_divergence_coef must be > 0 for alpha_divergence, got "
                f"{self.f_alpha_divergence_coef} (alpha -> 0 is reverse KL: use f_divergence_type='reverse_kl')."
            )
        if self.use_weighting and any(name in ("aot", "aot_unpaired") for name in self.loss_type):
            raise ValueError(
                "DPOConfig: use_weighting=True (WPO) cannot be combined with loss_type 'aot' or 'aot_unpaired': "
                "those losses sort the pairs within the batch, so a per-pair weight has no pair to apply to."
            )
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ValueError(f"DPOConfig.rpo_alpha must be >= 0 or None, got {self.rpo_alpha}.")
        if not self.discopop_tau > 0:
            raise ValueError(f"DPOConfig.discopop_tau must be > 0, got {self.discopop_tau} (the paper uses 0.05).")

    def _check_reference_options(self) -> None:
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(
                f"DPOConfig.ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}."
            )
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"DPOConfig.ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}.")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError(
                "DPOConfig: sync_ref_model=True updates the reference model during training, so reference "
                "log-probs computed before training would be stale. Set precompute_ref_log_probs=False or "
                "sync_ref_model=False."
            )
        if self.reference_free and (self.sync_ref_model or self.precompute_ref_log_probs):
            other = "sync_ref_model" if self.sync_ref_model else "precompute_ref_log_probs"
            raise ValueError(
                f"DPOConfig: reference_free=True uses no reference model, so {other}=True has nothing to do. "
                f"Set one of them to False."
            )


def _loss_type_list(loss_type: Any) -> list[str]:
    if isinstance(loss_type, str):
        # "sigmoid,bco_pair" from some launchers; plain names otherwise
        return [name.strip() for name in loss_type.split(",") if name.strip()] or [loss_type]
    if isinstance(loss_type, (list, tuple)):
        return [str(name) for name in loss_type]
    raise ValueError(
        f"DPOConfig.loss_type must be a loss name or a list of names, got {type(loss_type).__name__} {loss_type!r}."
    )


def _accelerator_supports_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
