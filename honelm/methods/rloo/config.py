"""Configuration of REINFORCE Leave-One-Out (RLOO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from honelm.diagnostics.codes import normalize_settings

_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
_VLLM_MODES = ("colocate", "server")
_IS_MODES = ("sequence_mask", "sequence_truncate")


@dataclass
class RLOOConfig(TrainingArguments):
    """Everything :class:`~honelm.RLOOTrainer` needs, on top of ``transformers.TrainingArguments``.

    Field names and defaults follow TRL's ``RLOOConfig``, so a TRL script keeps working when only
    the import changes; ``kl_in_reward``, ``max_prompt_length``, ``max_tool_calling_iterations``,
    ``multi_objective_aggregation`` and the vLLM importance-sampling fields are additions.

    Batch sizes count completions, not prompts: one optimizer step trains on
    ``per_device_train_batch_size * num_processes * gradient_accumulation_steps`` completions,
    ``num_generations`` per prompt. Defaults that differ from ``TrainingArguments``:
    ``learning_rate=1e-6``, ``logging_steps=10``, ``remove_unused_columns=False`` (reward
    functions receive the dataset's columns), ``bf16`` on when the accelerator supports it
    (``None`` = decide automatically).
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
        metadata={"help": "Allow models and tokenizers whose code ships with the checkpoint (`from_pretrained`)."},
    )
    disable_dropout: bool = field(
        default=False,
        metadata={
            "help": "Set every dropout of the policy and the reference model to 0, so that the log-probs of "
            "the training pass match those of generation."
        },
    )

    # ---- Data --------------------------------------------------------------------------------
    shuffle_dataset: bool = field(
        default=True, metadata={"help": "Visit the prompts in a new random order every epoch."}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt, in tokens: longer prompts keep their last tokens. `None`: no limit."},
    )

    # ---- Generation --------------------------------------------------------------------------
    num_generations: int = field(
        default=2,
        metadata={
            "help": "Completions sampled per prompt (at least 2: each one's baseline is the mean reward of "
            "the others). The generation batch must hold a whole number of prompts' groups."
        },
    )
    num_generations_eval: int | None = field(
        default=None,
        metadata={"help": "Completions per prompt during evaluation. `None`: `num_generations`."},
    )
    max_completion_length: int = field(
        default=512,
        metadata={"help": "Most tokens per completion (tool results included in multi-turn rollouts)."},
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions generated per round, over all processes. `None`: "
            "`per_device_train_batch_size * num_processes * steps_per_generation`. Give this or "
            "`steps_per_generation`, not both."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches (forward/backward passes) fed by one generation round. `None`: "
            "`gradient_accumulation_steps`, so one round feeds one optimizer step."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (> 0); the training log-probs use the same temperature."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: keep the most likely tokens whose probability reaches `top_p` (0, 1]."},
    )
    top_k: int = field(default=0, metadata={"help": "Keep only the `top_k` most likely tokens; 0 keeps all."})
    min_p: float | None = field(
        default=None,
        metadata={"help": "Drop tokens less likely than `min_p` times the most likely one; `None` or 0 keeps all."},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Penalty on tokens already in the prompt or completion (> 1 discourages them); 1 is off."},
    )
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Extra arguments of `apply_chat_template` for prompts (e.g. `{'enable_thinking': false}`)."},
    )
    max_tool_calling_iterations: int | None = field(
        default=None,
        metadata={
            "help": "With `tools`: at most this many rounds of tool calls per completion. `None`: until the "
            "completion budget is spent."
        },
    )

    # ---- vLLM --------------------------------------------------------------------------------
    use_vllm: bool = field(
        default=False,
        metadata={"help": "Generate with vLLM (needs `pip install honelm[vllm]` and a CUDA GPU)."},
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "`colocate`: a vLLM engine inside each training process; `server`: a separate `vllm serve` "
            "process that receives the weights after every optimizer step.",
            "choices": _VLLM_MODES,
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Colocate: share of GPU memory vLLM may take."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Colocate: GPUs per vLLM engine."})
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Colocate: free vLLM's GPU memory while the model trains."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Colocate: longest prompt + completion vLLM handles. `None`: the model's."}
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "Server: its address (e.g. `http://localhost:8000`); overrides host and port."},
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server: host, when no base URL is given."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server: port, when no base URL is given."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server: seconds one request may take."}
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={
            "help": "Weight the loss by `pi_old / pi_vllm`, correcting for vLLM's log-probs differing from the "
            "trainer's (kernels, precision)."
        },
    )
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask",
        metadata={
            "help": "One weight per completion, `pi_old(y) / pi_vllm(y)`: `sequence_mask` drops completions "
            "whose weight falls outside [min, max], `sequence_truncate` clamps the weight into it.",
            "choices": _IS_MODES,
        },
    )
    vllm_importance_sampling_clip_min: float = field(
        default=0.0, metadata={"help": "Lower bound of the importance weights."}
    )
    vllm_importance_sampling_clip_max: float = field(
        default=3.0, metadata={"help": "Upper bound of the importance weights."}
    )

    # ---- Training ----------------------------------------------------------------------------
    beta: float = field(
        default=0.05,
        metadata={
            "help": "KL coefficient. `0.0`: no KL term and no reference model is loaded (less memory, faster)."
        },
    )
    kl_in_reward: bool = field(
        default=True,
        metadata={
            "help": "`true`: `beta` times the sequence's KL estimate `sum_t (log pi_old - log pi_ref)` is "
            "subtracted from its reward before the baseline (RLOO as in Ahmadian et al. 2024); `false`: "
            "`beta` times the per-token k3 KL, summed over the completion, is added to the loss."
        },
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "Updates per generation round (mu); the old log-probs are computed once per round."},
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Clipping: the sequence ratio is kept within [1 - epsilon, 1 + epsilon_high]."}
    )
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping epsilon. `None`: `epsilon`."}
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function. `None`: every weight is 1."},
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "How several rewards combine: `sum_then_normalize` (the weighted sum) or "
            "`normalize_then_sum` (each reward standardized within its group first, GDPO).",
            "choices": _AGGREGATIONS,
        },
    )
    reward_clip_range: list[float] | None = field(
        default=None,
        metadata={"help": "`[min, max]`: the combined reward is clipped into this range. `None`: no clipping."},
    )
    normalize_advantages: bool = field(
        default=False,
        metadata={"help": "Standardize the advantages over the whole generation batch (mean 0, std 1)."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Leave completions cut by `max_completion_length` out of the loss."},
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Every `ref_model_sync_steps` steps, move the reference toward the policy: "
            "`ref = alpha * policy + (1 - alpha) * ref` (TR-DPO)."
        },
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "`alpha` of `sync_ref_model`."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Optimizer steps between reference syncs."})

    # ---- Logging -----------------------------------------------------------------------------
    log_completions: bool = field(
        default=False,
        metadata={"help": "Print a sample of prompts, completions, rewards and advantages at every log."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Rows printed by `log_completions`. `None`: the whole last round."}
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
        metadata={"help": "Kept False: reward functions receive every dataset column."},
    )
    bf16: bool | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": "bf16 mixed precision. `None`: on when the accelerator supports bf16 and fp16 is off."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _accelerator_supports_bf16()
        self._check_fields()
        normalize_settings(self, "RLOOConfig")  # unknown codes, thresholds, levels: clear errors
        super().__post_init__()
        self._resolve_generation_batch()

    def _check_fields(self) -> None:
        _check_choice("multi_objective_aggregation", self.multi_objective_aggregation, _AGGREGATIONS)
        _check_choice("vllm_mode", self.vllm_mode, _VLLM_MODES)
        _check_choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, _IS_MODES)
        for name in ("num_generations", "num_generations_eval"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(
                    f"RLOOConfig.{name}={value}: RLOO needs at least 2 completions per prompt, because each "
                    "completion's baseline is the mean reward of the others. Set it to 2 or more (4 to 16 is usual)."
                )
        _positive("max_completion_length", self.max_completion_length)
        _positive("num_iterations", self.num_iterations)
        _positive("ref_model_sync_steps", self.ref_model_sync_steps)
        for name in ("max_prompt_length", "generation_batch_size", "steps_per_generation"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if not self.temperature > 0:
            raise ValueError(
                f"RLOOConfig.temperature={self.temperature}: sampling needs a temperature > 0 (greedy decoding "
                "would make every completion of a prompt the same, leaving nothing to compare)."
            )
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(
                f"RLOOConfig: epsilon={self.epsilon} and epsilon_high={self.epsilon_high} must be >= 0."
            )
        if self.beta < 0:
            raise ValueError(f"RLOOConfig.beta={self.beta} must be >= 0 (0 turns the KL term off).")
        if self.reward_clip_range is not None:
            bounds = list(self.reward_clip_range)
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ValueError(
                    f"RLOOConfig.reward_clip_range={self.reward_clip_range!r} must be two numbers [min, max] "
                    "with min <= max."
                )
            self.reward_clip_range = [float(bounds[0]), float(bounds[1])]
        if self.sync_ref_model and self.beta == 0.0:
            raise ValueError(
                "RLOOConfig: sync_ref_model=True with beta=0.0: no reference model is used, so there is nothing "
                "to synchronize. Set sync_ref_model=False, or a beta > 0."
            )
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"RLOOConfig.ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in [0, 1].")
        if self.use_vllm and self.vllm_mode == "colocate" and self.vllm_tensor_parallel_size > 1:
            raise ValueError(
                "RLOOConfig: vllm_tensor_parallel_size > 1 in colocate mode is not supported by RLOOTrainer (every "
                "rank of a tensor-parallel group would need the same prompts). Use vllm_mode='server' for models "
                "that need several GPUs to generate, or vllm_tensor_parallel_size=1."
            )
        if self.vllm_importance_sampling_clip_min > self.vllm_importance_sampling_clip_max:
            raise ValueError(
                "RLOOConfig: vllm_importance_sampling_clip_min must not exceed vllm_importance_sampling_clip_max."
            )

    def _resolve_generation_batch(self) -> None:
        """Fill in ``generation_batch_size`` and ``steps_per_generation`` and check that a round
        holds whole groups (after ``TrainingArguments`` knows the number of processes)."""
        per_step = self.per_device_train_batch_size * self.world_size  # completions per micro-step, all processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "RLOOConfig: give `generation_batch_size` or `steps_per_generation`, not both (each one "
                f"determines the other: generation_batch_size = {per_step} completions per micro-step x "
                "steps_per_generation)."
            )
        if self.generation_batch_size is None:
            steps = self.steps_per_generation or self.gradient_accumulation_steps
            self.steps_per_generation = steps
            self.generation_batch_size = per_step * steps
        else:
            if self.generation_batch_size % per_step:
                raise ValueError(
                    f"RLOOConfig.generation_batch_size={self.generation_batch_size} must be a multiple of "
                    f"per_device_train_batch_size x num_processes = {per_step}, so that each round splits into "
                    "whole micro-batches."
                )
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"RLOOConfig: a generation round of {self.generation_batch_size} completions "
                f"(per_device_train_batch_size={self.per_device_train_batch_size} x {self.world_size} processes x "
                f"steps_per_generation={self.steps_per_generation}) does not split into groups of "
                f"num_generations={self.num_generations}. Make per_device_train_batch_size (or "
                "generation_batch_size) a multiple of num_generations."
            )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"RLOOConfig.{name}={value!r} is not supported. Choose one of: {', '.join(choices)}.")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"RLOOConfig.{name}={value} must be a positive integer.")


def _accelerator_supports_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())

