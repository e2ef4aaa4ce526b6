"""Configuration of Group Relative Policy Optimization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from honelm.diagnostics.codes import normalize_settings

from .loss import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    SAMPLING_CORRECTIONS,
    SCALE_REWARDS,
)

_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
_VLLM_MODES = ("colocate", "server")
# generation_kwargs keys the built-in sampler understands (everything else is refused).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class GRPOConfig(TrainingArguments):
    """Everything :class:`~honelm.GRPOTrainer` needs, on top of ``transformers.TrainingArguments``.

    Batch sizes count *completions*: one optimizer step trains on
    ``per_device_train_batch_size * num_processes * gradient_accumulation_steps`` completions,
    ``num_generations`` of each prompt. One generation round samples ``generation_batch_size``
    completions and feeds ``steps_per_generation`` micro-batches (optimizer steps when
    ``gradient_accumulation_steps=1``), ``num_iterations`` times over.

    Defaults that differ from ``TrainingArguments``: ``learning_rate=1e-6``, ``logging_steps=10``,
    ``remove_unused_columns=False`` (reward functions receive every dataset column), ``bf16`` on
    when the accelerator supports it (``None`` = decide automatically).
    """

    # ---- Model -------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when `model` (or a reward model) is a name or "
            "path (e.g. `{'attn_implementation': 'sdpa'}`). `dtype` defaults to 'auto'."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers whose code lives in their repository (loaded by name)."},
    )
    disable_dropout: bool = field(
        default=False,
        metadata={"help": "Set every dropout probability of the policy (and reference) model to 0."},
    )

    # ---- Data --------------------------------------------------------------------------------
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Prompts longer than this many tokens keep their last tokens. `None`: no limit."},
    )
    shuffle_dataset: bool = field(
        default=True, metadata={"help": "Shuffle the prompts (a new order every epoch, from `seed`)."}
    )
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Extra arguments of `apply_chat_template` for conversational prompts (e.g. "
                  "`{'enable_thinking': false}`)."},
    )

    # ---- Generation --------------------------------------------------------------------------
    num_generations: int = field(
        default=8,
        metadata={"help": "Completions sampled per prompt (the group whose rewards are compared). At least 2."},
    )
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Completions per prompt during evaluation; defaults to `num_generations`."}
    )
    max_completion_length: int = field(
        default=512,
        metadata={"help": "Most tokens a completion may have (tool results included in multi-turn rollouts)."},
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions sampled per generation round, over all processes. Defaults to "
            "`per_device_train_batch_size * num_processes * steps_per_generation`. Give this or "
            "`steps_per_generation`, not both."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches fed by one generation round; defaults to `gradient_accumulation_steps` "
            "(one round per optimizer step). Give this or `generation_batch_size`, not both."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature; the training log-probs use the same temperature."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1 keeps every token."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens; 0 keeps every token."})
    min_p: float | None = field(
        default=None,
        metadata={"help": "Drop tokens less likely than `min_p` times the most likely one; `None` or 0: off."},
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalize tokens already in the prompt or completion (> 1); 1: off."}
    )
    generation_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Overrides of the sampling fields (`temperature`, `top_p`, `top_k`, `min_p`, "
            "`repetition_penalty`); other keys are refused."
        },
    )
    max_tool_calling_iterations: int | None = field(
        default=None,
        metadata={"help": "With `tools`: at most this many rounds of tool calls per rollout. `None`: until "
                  "the completion budget is spent."},
    )
    tool_timeout: float | None = field(
        default=30.0,
        metadata={"help": "Seconds a tool call may take before it becomes an error result the model reads."},
    )

    # ---- vLLM --------------------------------------------------------------------------------
    use_vllm: bool = field(
        default=False,
        metadata={"help": "Generate with vLLM (`pip install honelm[vllm]`, CUDA) instead of the model in "
                  "process."},
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "`colocate`: a vLLM engine in each training process, weights copied in place after each "
            "step. `server`: a separate `vllm serve` process, weights pushed over NCCL."
        },
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "Colocate: free vLLM's GPU memory between generation rounds (slower, leaner)."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Colocate: share of GPU memory vLLM may take."}
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Colocate: GPUs per vLLM engine (only 1 is supported by the trainer)."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Colocate: longest prompt + completion vLLM plans for; `None`: the model's."}
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "Server: its URL (e.g. `http://10.0.0.2:8000`); overrides host and port."},
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server: host name, without base URL."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server: port, without base URL."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server: seconds to wait for one request."}
    )
    vllm_group_port: int = field(
        default=51216, metadata={"help": "Server: port of the NCCL group that carries the weights."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={
            "help": "With vLLM: weight the policy loss by pi_trainer / pi_vLLM of the sampled tokens, "
            "correcting for the two engines' numerical mismatch."
        },
    )
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask",
        metadata={
            "help": "`token_truncate`, `token_mask`, `sequence_truncate` or `sequence_mask`: per-token or "
            "per-sequence ratios, clamped into [clip_min, clip_max] (truncate) or zeroed outside it (mask)."
        },
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the correction ratio; `None`: 0."}
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "Upper bound of the correction ratio; `None`: no bound."}
    )

    # ---- Loss --------------------------------------------------------------------------------
    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "`dapo` (token-level sum over the step's tokens), `grpo` (per-sequence mean), `bnpo` "
            "(mean over the micro-batch's tokens), `dr_grpo` (sum / (B * max_completion_length)), `cispo` "
            "(clipped, detached importance weights), `sapo` (soft gate instead of the clip)."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "Weight of the k3 KL penalty to the reference model. 0: no reference model is loaded."},
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range: ratios below 1 - epsilon are clipped."})
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clip range (ratios above 1 + epsilon_high); defaults to `epsilon` (DAPO: 0.28). "
            "For `cispo`: the cap of the importance weight itself (e.g. 5.0)."
        },
    )
    delta: float | None = field(
        default=None,
        metadata={"help": "Two-sided clipping: cap the unclipped ratio at `delta` (> 1 + epsilon_high)."},
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={"help": "`token`: one ratio per token; `sequence` (GSPO): the geometric mean per sequence."},
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "Updates per generation round (PPO epochs). Above 1 the old log-probs are computed once "
                  "per round."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Divide the centered rewards by the group's standard deviation (`group`, `true`), the "
            "batch's (`batch`), or not at all (`none`, `false`; Dr. GRPO)."
        },
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Exclude completions cut by `max_completion_length` from the loss (DAPO)."},
    )
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={"help": "Train only on the tokens in the top share of entropy (0.2 in 'Beyond the 80/20 "
                  "rule'); 1.0 keeps every token."},
    )
    entropy_coef: float = field(
        default=0.0, metadata={"help": "Weight of an entropy bonus in the loss (exploration); 0: off."}
    )
    sapo_temperature_pos: float = field(
        default=1.0, metadata={"help": "`sapo`: gate temperature for tokens of positive-advantage completions."}
    )
    sapo_temperature_neg: float = field(
        default=1.05, metadata={"help": "`sapo`: gate temperature for tokens of the other completions."}
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "Every `ref_model_sync_steps` steps mix the policy into the reference model (TR-DPO)."},
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "Mixing weight: ref <- alpha * policy + (1 - alpha) * ref."}
    )
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Optimizer steps between reference syncs."})

    # ---- Rewards -----------------------------------------------------------------------------
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function (default: all 1)."},
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "`sum_then_normalize`: weighted sum of the rewards, then group advantages; "
            "`normalize_then_sum` (GDPO): each reward normalized in its group, then summed."
        },
    )

    # ---- Logging -----------------------------------------------------------------------------
    log_completions: bool = field(
        default=False,
        metadata={"help": "Print a sample of prompts, completions and rewards at every logging step."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "How many completions `log_completions` prints; `None`: 8."}
    )

    # ---- Diagnostics -------------------------------------------------------------------------
    diagnostics: bool = field(
        default=True,
        metadata={
            "help": "Watch the run's metrics and the machine and report recognized problems (e.g. groups whose "
            "rewards are all equal, collapsing entropy, completions cut at the length limit): on the console, in "
            "`output_dir/diagnostics.jsonl` and as `diagnostics/*` metrics. See docs/diagnostics.md."
        },
    )
    diagnostics_stop_on: Literal["error", "critical"] | None = field(
        default=None,
        metadata={
            "help": "Stop training when a problem of this severity is found (`critical`, or `error` for errors "
            "and critical problems), after saving a checkpoint. `None`: report only."
        },
    )
    diagnostics_thresholds: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Per-code thresholds: a number sets the code's main threshold, a mapping sets them by name, "
            "e.g. `{\"LOSS_DIVERGING\": {\"ratio\": 3}}`."
        },
    )
    diagnostics_silence: list[str] | None = field(
        default=None,
        metadata={"help": "Diagnostic codes never to report, e.g. `SYS_LOW_MEMORY_USE`."},
    )

    # ---- Defaults that differ from TrainingArguments -----------------------------------------
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or fraction)."})
    remove_unused_columns: bool | None = field(
        default=False,
        metadata={"help": "Kept False: every dataset column is passed to the reward functions."},
    )
    bf16: bool | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "bf16 mixed precision. `None`: on when the accelerator supports bf16 and fp16 is off."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _accelerator_supports_bf16()
        self.scale_rewards = _scale_rewards(self.scale_rewards)
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_choice("multi_objective_aggregation", self.multi_objective_aggregation, _AGGREGATIONS)
        _check_choice("vllm_mode", self.vllm_mode, _VLLM_MODES)
        _check_choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, SAMPLING_CORRECTIONS)
        _check_values(self)
        normalize_settings(self, "GRPOConfig")  # unknown codes, thresholds, levels: clear errors
        super().__post_init__()
        self._resolve_generation_batch()

    def _resolve_generation_batch(self) -> None:
        """Derive ``generation_batch_size`` and ``steps_per_generation`` from each other."""
        per_step = self.per_device_train_batch_size * self.world_size  # completions per micro-batch, all processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "GRPOConfig: give `generation_batch_size` or `steps_per_generation`, not both (each determines "
                "the other)."
            )
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        elif self.generation_batch_size % per_step:
            raise ValueError(
                f"GRPOConfig.generation_batch_size={self.generation_batch_size} must be a multiple of "
                f"per_device_train_batch_size * num_processes = {per_step} (the completions of one micro-batch)."
            )
        else:
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.steps_per_generation < 1:
            raise ValueError(f"GRPOConfig.steps_per_generation must be >= 1, got {self.steps_per_generation}.")
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"GRPOConfig: the generation batch of {self.generation_batch_size} completions "
                f"(per_device_train_batch_size={self.per_device_train_batch_size} x {self.world_size} process(es) x "
                f"steps_per_generation={self.steps_per_generation}) must be a multiple of num_generations="
                f"{self.num_generations}, so that every prompt gets its whole group. Change one of them."
            )
        strategy = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        eval_generations = self.num_generations_eval or self.num_generations
        eval_batch = self.per_device_eval_batch_size * self.world_size
        if strategy != "no" and eval_batch % eval_generations:
            raise ValueError(
                f"GRPOConfig: the evaluation batch of {eval_batch} completions (per_device_eval_batch_size x "
                f"processes) must be a multiple of num_generations_eval={eval_generations}."
            )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GRPOConfig.{name}={value!r} is not supported. Choose one of: {', '.join(choices)}.")


def _scale_rewards(value: Any) -> str:
    """TRL accepts booleans: ``True`` means ``"group"``, ``False`` means ``"none"``."""
    if isinstance(value, bool):
        return "group" if value else "none"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return "group" if value.strip().lower() == "true" else "none"
    if value not in SCALE_REWARDS:
        raise ValueError(
            f"GRPOConfig.scale_rewards={value!r} is not supported. Choose one of: group, batch, none (or true/false)."
        )
    return value


def _check_values(config: GRPOConfig) -> None:
    """Ranges of the numeric fields, with the field named."""
    checks = [
        ("num_generations", config.num_generations >= 2, "must be >= 2: advantages compare completions of a prompt"),
        ("max_completion_length", config.max_completion_length >= 1, "must be >= 1"),
        ("num_iterations", config.num_iterations >= 1, "must be >= 1"),
        ("beta", config.beta >= 0, "must be >= 0"),
        ("epsilon", config.epsilon >= 0, "must be >= 0"),
        ("temperature", config.temperature > 0, "must be > 0 (the training log-probs divide by it)"),
        ("top_entropy_quantile", 0.0 <= config.top_entropy_quantile <= 1.0, "must be in [0, 1]"),
        ("entropy_coef", config.entropy_coef >= 0, "must be >= 0"),
        ("vllm_tensor_parallel_size", config.vllm_tensor_parallel_size == 1,
         "must be 1: the trainer runs one vLLM engine per process"),
    ]
    if config.num_generations_eval is not None:
        checks.append(("num_generations_eval", config.num_generations_eval >= 1, "must be >= 1"))
    if config.max_prompt_length is not None:
        checks.append(("max_prompt_length", config.max_prompt_length >= 1, "must be >= 1 or None"))
    if config.epsilon_high is not None:
        checks.append(("epsilon_high", config.epsilon_high >= 0, "must be >= 0"))
    if config.delta is not None:
        high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        checks.append(("delta", config.delta > 1.0 + high, f"must be > 1 + epsilon_high = {1.0 + high}"))
    if config.reward_weights is not None:
        checks.append(("reward_weights", len(config.reward_weights) > 0, "must list one weight per reward function"))
    for name, ok, message in checks:
        if not ok:
            raise ValueError(f"GRPOConfig.{name}={getattr(config, name)!r} {message}.")
    unknown = sorted(set(config.generation_kwargs or {}) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"GRPOConfig.generation_kwargs: {unknown} cannot be applied; the sampler understands "
            f"{', '.join(SAMPLING_KEYS)}. Set those fields directly, or remove the other keys."
        )


def _accelerator_supports_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
