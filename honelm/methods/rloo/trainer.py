"""REINFORCE Leave-One-Out (RLOO).

For every prompt the policy samples ``num_generations`` completions; reward functions score
them; each completion's advantage is its reward minus the mean reward of the prompt's *other*
completions (the leave-one-out baseline), and the policy learns ``A * grad log pi(completion)``,
written with the clipped sequence probability ratio so that a round can be reused
(``num_iterations``). A KL penalty to a frozen reference (``beta``) is subtracted from each
sequence's reward (default, Ahmadian et al. 2024) or added to the loss (per-token k3). One
generation round feeds ``steps_per_generation`` micro-batches; a prompt's group may span
processes, so rewards are gathered before the baselines are taken. Log-probs of completion
tokens only come from the final hidden states through the chunked kernels of
:mod:`honelm.ops`, never from full ``(tokens, vocab)`` logits. Diagnostics
(:mod:`honelm.diagnostics`) watch the logged metrics (reward spread, entropy, clipping, length).

    honelm rloo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward --num_generations 8 --per_device_train_batch_size 8
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import AutoTokenizer, Trainer, TrainerCallback, set_seed

from honelm.data import validate_dataset
from honelm.diagnostics.callback import attach_diagnostics
from honelm.generation import (
    SamplingParams,
    TransformersBackend,
    rollout,
    rollout_from_dict,
)
from honelm.models import last_hidden_states, load_causal_lm
from honelm.ops import lm_head_weight_and_bias, masked_selective_logps
from honelm.rewards import (
    RewardModel,
    aggregate_rewards,
    compute_rewards,
    load_reward_funcs,
)

from .config import RLOOConfig
from .loss import (
    leave_one_out_advantages,
    normalize_advantages,
    rloo_loss,
    sampling_correction,
    sequence_kl,
)

logger = logging.getLogger(__name__)

# Row columns that are not passed on to reward functions (as in TRL).
_NOT_REWARD_COLUMNS = ("prompt", "completion", "completion_ids")


def _keep_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The data collator: rows stay rows; prompts are tokenized when the round is generated."""
    return list(rows)


class RoundSampler(Sampler[int]):
    """Dataset indices for online RL, one generation round at a time.

    A round takes ``prompts_per_round`` prompts (in a new random order every epoch when
    ``shuffle``), lists each one ``num_generations`` times in a row, and is listed ``repeats``
    times: the trainer reads one dataloader batch per micro-step but generates only on the
    first batch of a round. Prompts left over at the end of an epoch (fewer than a round) are
    skipped. Every process builds the same order from ``seed`` and the epoch.
    """

    def __init__(
        self, num_rows: int, num_generations: int, prompts_per_round: int, repeats: int = 1,
        shuffle: bool = True, seed: int = 0,
    ) -> None:
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_round, self.repeats = prompts_per_round, repeats
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        for start in range(0, self.num_rows - self.prompts_per_round + 1, self.prompts_per_round):
            chunk = order[start : start + self.prompts_per_round]
            for _ in range(self.repeats):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        rounds = self.num_rows // self.prompts_per_round
        return rounds * self.prompts_per_round * self.num_generations * self.repeats


class RLOOTrainer(Trainer):
    """Trainer for REINFORCE Leave-One-Out (see the module docstring and ``docs/rloo.md``).

    Args:
        model: A model name or local path (loaded with ``args.model_init_kwargs``, dtype
            ``"auto"``) or an instantiated causal LM (or ``peft.PeftModel``).
        reward_funcs: One or a list of reward functions
            ``f(prompts, completions, completion_ids, **columns) -> list[float | None]`` (sync or
            ``async``), reward-model names or paths, or sequence-classification models.
        args: An :class:`RLOOConfig`; defaults to one with ``output_dir="<model>-RLOO"``.
        train_dataset, eval_dataset: Datasets with a ``prompt`` column (strings or lists of
            messages); every other column reaches the reward functions. ``eval_dataset`` may be
            a dict of named datasets.
        processing_class: The tokenizer; loaded from ``model`` when omitted.
        reward_processing_classes: Tokenizers of the reward models (one, or one per reward
            function with ``None`` for the others); loaded from the models when omitted.
        callbacks, optimizers: As in ``transformers.Trainer``.
        quantization_config: Passed to ``from_pretrained`` when ``model`` is a name or path.
        peft_config: A ``peft`` config (e.g. ``LoraConfig``): only the adapters train and the
            reference is the model with its adapter disabled (no copy).
        tools: Python functions the model may call (conversational prompts only); tool results
            are appended to the completion and masked from the loss.
        rollout_func: ``rollout_func(prompts, trainer) -> dict`` replaces the built-in
            generation (see :data:`honelm.generation.RolloutFunc`).
    """

    _tag_names = ["honelm", "rloo"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: RLOOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Sequence[Callable[..., Any]] | None = None,
        rollout_func: Callable[[list[Any], Any], dict[str, Any]] | None = None,
    ) -> None:
        model_path = model if isinstance(model, str) else None
        model_id = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if args is None:
            name = (model_id or "model").rstrip("/").split("/")[-1]
            args = RLOOConfig(output_dir=f"{name}-RLOO")
        elif not isinstance(args, RLOOConfig):
            raise TypeError(f"RLOOTrainer: `args` must be an RLOOConfig, got {type(args).__name__}.")
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError(
                "RLOOTrainer: give at least one reward function in `reward_funcs` (a function "
                "f(prompts, completions, **kwargs) -> list[float], a reward model name or path, or a model)."
            )
        if args.use_vllm:
            from honelm.generation import is_vllm_available
            from honelm.generation.vllm_backend import VLLM_INSTALL_HINT

            if not is_vllm_available():
                raise ImportError(VLLM_INSTALL_HINT)
        model = _load_model(model, args, quantization_config)
        if processing_class is None:
            if model_id is None:
                raise ValueError("RLOOTrainer: pass `processing_class` (the tokenizer); the model has no name to load it from.")
            processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.reward_funcs = load_reward_funcs(
            reward_funcs, reward_processing_classes, model_init_kwargs=_init_kwargs(args.model_init_kwargs, args, None)
        )
        self._reward_weights = _reward_weights(args.reward_weights, len(self.reward_funcs))
        model, ref_model = self._models(model, model_path, args, peft_config, quantization_config)
        self._model_id = model_id
        self._output_dir_existed = os.path.isdir(args.output_dir)
        self._dataset_name = _dataset_name(train_dataset)
        _check_prompts(train_dataset, "train", args, training=True)
        for split, dataset in (eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]):
            _check_prompts(dataset, split if split == "eval" else f"eval/{split}", args, training=False)

        super().__init__(
            model=model,
            args=args,
            data_collator=_keep_rows,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # The loss is a mean over the completions of each micro-batch: the Trainer divides it
        # by the number of gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        for func in self.reward_funcs:
            if isinstance(func, RewardModel):
                func.model.to(self.accelerator.device).eval()
        if args.sync_ref_model:
            self.add_callback(_SyncReferenceCallback(self))
        self.tools = list(tools) if tools else None
        self.rollout_func = rollout_func
        self._generation_backend: Any = None
        self._synced_step = -1  # optimizer step whose weights vLLM holds
        self._step = 0  # micro-steps taken (one dataloader batch each)
        self._buffered: list[dict[str, torch.Tensor]] | None = None
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._timing = {"generation": 0.0, "reward": 0.0, "training": 0.0}
        self._timing_since_step = 0
        self._total_tokens = {"train": 0, "eval": 0}
        self._last_round: dict[str, list[Any]] = {}
        # No pre-flight data checks: prompts are tokenized as they are generated. The metrics are watched.
        self.diagnostics = attach_diagnostics(self, "rloo", output_dir_existed=self._output_dir_existed)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ---- setup ----------------------------------------------------------------------------

    def _models(
        self, model: Any, model_path: str | None, args: RLOOConfig, peft_config: Any, quantization_config: Any
    ) -> tuple[Any, Any]:
        """The policy (wrapped with PEFT when asked) and the frozen reference model, or None."""
        peft = peft_config is not None or _is_peft_model(model)
        if peft and args.sync_ref_model:
            raise ValueError(
                "RLOOConfig.sync_ref_model=True needs a separate reference model to update, but with PEFT the "
                "reference is the model with its adapter disabled. Set sync_ref_model=False, or train without PEFT."
            )
        if args.beta != 0.0 and _is_peft_model(model) and peft_config is None:
            logger.warning(
                "RLOOTrainer: the model already has a PEFT adapter; the reference is the model with the adapter "
                "disabled (the base model)."
            )
        ref_model = None
        if args.beta != 0.0 and not peft:
            if model_path is not None:  # load it again, as the policy was loaded
                ref_model = load_causal_lm(model_path, _init_kwargs(args.model_init_kwargs, args, quantization_config))
            else:
                ref_model = copy.deepcopy(model)
        if peft_config is not None:
            set_seed(args.seed)  # the adapter's random initialization follows the seed
            model = _wrap_peft(model, peft_config, args)
        if args.disable_dropout:
            _disable_dropout(model)
        if ref_model is not None:
            ref_model.requires_grad_(False)
            ref_model.eval()
            if args.disable_dropout:
                _disable_dropout(ref_model)
        return model, ref_model

    # ---- data -----------------------------------------------------------------------------

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        return dataset  # reward functions read every column

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def get_train_dataloader(self) -> Any:
        if self.train_dataset is None:
            raise ValueError("RLOOTrainer: training requires a train_dataset.")
        # One batch per process holds its part of a whole generation round.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int]:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        return RoundSampler(
            len(dataset),
            args.num_generations,
            args.generation_batch_size // args.num_generations,
            repeats=args.steps_per_generation * args.num_iterations,
            shuffle=args.shuffle_dataset,
            seed=args.seed,
        )

    def _get_eval_sampler(self, eval_dataset: Any) -> Sampler[int]:
        num_generations = self._num_generations("eval")
        if (self.args.per_device_eval_batch_size * self.args.world_size) % num_generations:
            raise ValueError(
                f"RLOOTrainer: evaluation batches of per_device_eval_batch_size={self.args.per_device_eval_batch_size}"
                f" x {self.args.world_size} processes do not hold whole groups of {num_generations} completions. "
                "Make per_device_eval_batch_size a multiple of num_generations_eval (or num_generations)."
            )
        return RoundSampler(len(eval_dataset), num_generations, 1, shuffle=False)

    def _num_generations(self, mode: str) -> int:
        if mode == "eval" and self.args.num_generations_eval is not None:
            return self.args.num_generations_eval
        return self.args.num_generations

    # ---- one generation round -------------------------------------------------------------

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, torch.Tensor]:
        """Generate and score a round on its first micro-step, then hand out its parts."""
        if not self.model.training:
            return self._generate_and_score(generation_batch, "eval")
        steps = self.args.steps_per_generation
        if self._step % (steps * self.args.num_iterations) == 0 or self._buffered is None:
            self._buffered = _split_round(self._generate_and_score(generation_batch, "train"), steps)
        inputs = self._buffered[self._step % steps]
        self._step += 1
        return inputs

    def _generate_and_score(self, rows: list[dict[str, Any]], mode: str) -> dict[str, torch.Tensor]:
        """Roll out this process's rows and return the tensors of its completions, with
        advantages computed from the rewards of every process."""
        args, device = self.args, self.accelerator.device
        num_generations = self._num_generations(mode)
        prompts = [row["prompt"] for row in rows]
        start = time.perf_counter()
        out = self._rollout(prompts, mode)
        self._timing["generation"] += time.perf_counter() - start
        batch = out.to_tensors(self._tokenizer.pad_token_id, device)
        loss_mask = batch["completion_mask"].clone()  # (B, T)
        if "tool_mask" in batch:
            loss_mask = loss_mask * batch["tool_mask"]
        if args.mask_truncated_completions:
            loss_mask = loss_mask * (~batch["truncated"]).unsqueeze(1).long()
        batch["loss_mask"] = loss_mask
        self._policy_references(batch, mode)

        start = time.perf_counter()
        rewards_per_func, names = self._score(rows, prompts, out)
        self._timing["reward"] += time.perf_counter() - start
        rewards_per_func = self.accelerator.gather(rewards_per_func.to(device))  # (N, K) every process
        rewards = self._combine(rewards_per_func, num_generations)  # (N,) NaN where nothing applies
        penalized = rewards
        kl_sums = None
        if args.beta != 0.0 and args.kl_in_reward:
            kl_sums = self.accelerator.gather(sequence_kl(batch["old_logps"], batch["ref_logps"], loss_mask))  # (N,)
            penalized = rewards - args.beta * kl_sums
        advantages = leave_one_out_advantages(penalized, num_generations)  # (N,)
        if args.normalize_advantages:
            advantages = normalize_advantages(advantages)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        local = slice(self.accelerator.process_index * len(rows), (self.accelerator.process_index + 1) * len(rows))
        batch["advantages"] = advantages[local]
        self._record_round(mode, batch, out, rewards_per_func, rewards, names, num_generations, kl_sums)
        if self.accelerator.is_main_process:
            self._last_round = {
                "prompt": prompts, "completion": list(out.completions),
                "reward": rewards[local].tolist(), "advantage": batch["advantages"].tolist(),
            }
        return {k: v for k, v in batch.items() if k not in ("logps", "raw_logps", "tool_mask", "truncated")}

    def _rollout(self, prompts: list[Any], mode: str) -> Any:
        tokenizer = self._tokenizer
        if self.rollout_func is not None:
            return rollout_from_dict(self.rollout_func(prompts, self), tokenizer, prompts=prompts)
        backend = self._backend()
        if self.args.use_vllm:
            self._sync_vllm_weights(backend)
        try:
            return rollout(
                backend,
                prompts,
                tokenizer,
                num_generations=1,  # the sampler already repeats each prompt num_generations times
                max_prompt_length=self.args.max_prompt_length,
                max_completion_length=self.args.max_completion_length,
                tools=self.tools,
                max_tool_calling_iterations=self.args.max_tool_calling_iterations,
                chat_template_kwargs=self.args.chat_template_kwargs,
            )
        finally:
            if self.args.use_vllm and self.args.vllm_mode == "colocate":
                backend.sleep()

    @property
    def _tokenizer(self) -> Any:
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    def _sampling_params(self) -> SamplingParams:
        args = self.args
        return SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )

    def _backend(self) -> Any:
        """The generation backend, built on first use: the policy itself, or vLLM."""
        if self._generation_backend is None:
            if self.args.use_vllm:
                self._generation_backend = _vllm_backend(self.args, self._model_id, self._sampling_params(),
                                                         self.accelerator.is_main_process)
            else:
                self._generation_backend = TransformersBackend(
                    self.accelerator.unwrap_model(self.model),
                    self._tokenizer,
                    self._sampling_params(),
                    max_completion_length=self.args.max_completion_length,
                    seed=self.args.seed + 7919 * self.accelerator.process_index,
                )
        if isinstance(self._generation_backend, TransformersBackend):
            self._generation_backend.model = self.accelerator.unwrap_model(self.model)
        return self._generation_backend

    def _sync_vllm_weights(self, backend: Any) -> None:
        """Push the policy's current weights to vLLM (once per optimizer step); LoRA adapters
        are merged for the push and unmerged after it."""
        from honelm.generation import named_weights_for_sync

        if self._synced_step == self.state.global_step:
            if self.args.vllm_mode == "colocate":
                backend.wake_up()
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        peft = _is_peft_model(unwrapped)
        if peft:
            unwrapped.merge_adapter()
        try:
            with torch.no_grad():
                weights = named_weights_for_sync(unwrapped)
                if self.args.vllm_mode == "colocate":
                    backend.wake_up(["weights"])
                    backend.load_weights(weights)
                    backend.wake_up(["kv_cache"])
                elif self.accelerator.is_main_process:
                    backend.load_weights(weights)
        finally:
            if peft:
                unwrapped.unmerge_adapter()
        self.accelerator.wait_for_everyone()
        self._synced_step = self.state.global_step

    # ---- log-probs ------------------------------------------------------------------------

    def _completion_logps(
        self, model: Any, batch: dict[str, torch.Tensor], loss_mask: torch.Tensor, entropy: bool = False
    ) -> Any:
        """Log-probs (and entropies) of the counted completion tokens ``(B, T)``, zeros elsewhere."""
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]  # (B, P)
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]  # (B, T)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left-padded prompts start at 0
        hidden, _ = last_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids)  # (B, P + T, H)
        width = prompt_ids.shape[1]
        hidden = hidden[:, width - 1 : width - 1 + completion_ids.shape[1]]  # (B, T, H): predicts each token
        weight, bias = lm_head_weight_and_bias(self.accelerator.unwrap_model(model))
        if not bool(loss_mask.any()):  # nothing to score: zeros, still connected to the graph
            zeros = hidden.sum(dim=-1) * 0.0
            return (zeros.float(), zeros.float()) if entropy else zeros.float()
        # The LM head runs under the forward's autocast (accelerate wraps only the forward).
        with self.accelerator.autocast():
            return masked_selective_logps(
                hidden, weight, completion_ids, loss_mask.bool(), bias,
                temperature=self.args.temperature, return_entropy=entropy,
            )

    @torch.no_grad()
    def _policy_references(self, batch: dict[str, torch.Tensor], mode: str) -> None:
        """Add ``old_logps`` (the generating policy's, when the round trains after the policy
        moves or feeds the KL-in-reward), ``ref_logps`` and the vLLM correction weights."""
        args = self.args
        reused = args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps
        need_old = mode == "train" and (
            reused or args.use_vllm or (args.beta != 0.0 and args.kl_in_reward)
        )
        if mode == "eval" and args.beta != 0.0 and args.kl_in_reward:
            need_old = True
        size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        if need_old:
            batch["old_logps"] = self._chunked_logps(self.model, batch, size)
        if args.beta != 0.0:
            with self._reference_context() as reference:
                batch["ref_logps"] = self._chunked_logps(reference, batch, size)
        if mode == "train" and args.use_vllm and args.vllm_importance_sampling_correction:
            weights, _ = sampling_correction(
                batch["old_logps"], batch["logps"], batch["loss_mask"], args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max,
            )
            batch["sequence_weights"] = weights

    def _chunked_logps(self, model: Any, batch: dict[str, torch.Tensor], size: int) -> torch.Tensor:
        parts = []
        for start in range(0, batch["completion_ids"].shape[0], size):
            part = {k: batch[k][start : start + size] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                 "completion_mask", "loss_mask")}
            parts.append(self._completion_logps(model, part, part["loss_mask"]))
        return torch.cat(parts, dim=0)  # (B, T)

    @contextlib.contextmanager
    def _reference_context(self) -> Iterator[Any]:
        """The module to run as the reference: the frozen copy, or the policy with its PEFT adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not _is_peft_model(unwrapped):
            raise RuntimeError("RLOOTrainer: beta != 0 but there is neither a reference model nor a PEFT adapter.")
        with unwrapped.disable_adapter():
            yield self.model

    # ---- rewards --------------------------------------------------------------------------

    def _score(self, rows: list[dict[str, Any]], prompts: list[Any], out: Any) -> tuple[torch.Tensor, list[str]]:
        """``(L, K)`` rewards of this process's completions, NaN where a function returned None."""
        columns = {k: [row.get(k) for row in rows] for k in rows[0] if k not in _NOT_REWARD_COLUMNS}
        columns.update(out.extra)
        result = compute_rewards(
            self.reward_funcs, prompts, out.completions, out.completion_ids, columns, trainer_state=self.state
        )
        return result.rewards_per_func, result.names

    def _combine(self, rewards_per_func: torch.Tensor, num_generations: int) -> torch.Tensor:
        """One reward per completion ``(N,)``: weighted and aggregated, clipped; NaN where
        no function applies (left out of the baselines, advantage 0)."""
        weights = self._reward_weights.to(rewards_per_func.device)
        rewards = aggregate_rewards(
            rewards_per_func, weights, aggregation=self.args.multi_objective_aggregation,
            num_generations=num_generations,
        )
        if self.args.reward_clip_range is not None:
            low, high = self.args.reward_clip_range
            rewards = rewards.clamp(min=low, max=high)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        return torch.where(unscorable, torch.full_like(rewards, float("nan")), rewards)

    # ---- loss -----------------------------------------------------------------------------

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if return_outputs:
            raise ValueError("RLOOTrainer.compute_loss has no outputs to return; call it with return_outputs=False.")
        mode = "train" if model.training else "eval"
        args = self.args
        loss_mask = inputs["loss_mask"]
        logps, entropy = self._completion_logps(model, inputs, loss_mask, entropy=True)  # (B, T) each
        kl_in_loss = args.beta != 0.0 and not args.kl_in_reward
        loss, metrics = rloo_loss(
            logps,
            inputs.get("old_logps"),
            inputs["advantages"],
            loss_mask,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            beta=args.beta if kl_in_loss else 0.0,
            ref_logps=inputs.get("ref_logps"),
            sequence_weights=inputs.get("sequence_weights"),
        )
        self._record_loss(mode, loss_mask, entropy, metrics)
        return loss

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        start = time.perf_counter()
        elsewhere = self._timing["generation"] + self._timing["reward"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        spent = time.perf_counter() - start - (self._timing["generation"] + self._timing["reward"] - elsewhere)
        self._timing["training"] += spent
        return loss

    def prediction_step(
        self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- metrics --------------------------------------------------------------------------

    def _record_round(
        self, mode: str, batch: dict[str, torch.Tensor], out: Any, rewards_per_func: torch.Tensor,
        rewards: torch.Tensor, names: list[str], num_generations: int, kl_sums: torch.Tensor | None,
    ) -> None:
        """Metrics of a generation round, over every process's completions."""
        m = self._metrics[mode]
        weighted = (rewards_per_func * self._reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        weighted = torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.nan, weighted)  # (N,)
        m["reward"].append(_nanmean(weighted))
        m["reward_std"].append(_nanstd(weighted))
        for k, name in enumerate(names):
            m[f"rewards/{name}/mean"].append(_nanmean(rewards_per_func[:, k]))
            m[f"rewards/{name}/std"].append(_nanstd(rewards_per_func[:, k]))
        grouped = rewards.view(-1, num_generations)  # (P, G)
        spread = torch.nan_to_num(grouped, nan=0.0).std(dim=1)
        m["frac_reward_zero_std"].append(float(torch.isclose(spread, torch.zeros_like(spread)).float().mean()))

        lengths = self.accelerator.gather(batch["completion_mask"].sum(dim=1))  # (N,)
        truncated = self.accelerator.gather(batch["truncated"].long()).bool()
        m["completions/mean_length"].append(float(lengths.float().mean()))
        m["completions/min_length"].append(float(lengths.min()))
        m["completions/max_length"].append(float(lengths.max()))
        m["completions/clipped_ratio"].append(float(truncated.float().mean()))
        ended = lengths[~truncated].float()
        m["completions/mean_terminated_length"].append(float(ended.mean()) if ended.numel() else 0.0)
        m["completions/min_terminated_length"].append(float(ended.min()) if ended.numel() else 0.0)
        m["completions/max_terminated_length"].append(float(ended.max()) if ended.numel() else 0.0)
        if kl_sums is not None:
            tokens = self.accelerator.gather(batch["loss_mask"].sum().reshape(1)).sum()
            m["kl"].append(float(kl_sums.sum() / tokens.clamp(min=1)))
        if out.tool_call_counts is not None:
            counts = torch.tensor([out.tool_call_counts, out.tool_failure_counts], dtype=torch.float32,
                                  device=lengths.device).T  # (L, 2)
            counts = self.accelerator.gather(counts)
            m["tools/call_frequency"].append(float(counts[:, 0].mean()))
            m["tools/failure_frequency"].append(float(counts[:, 1].sum() / counts[:, 0].sum().clamp(min=1)))
        tokens_seen = batch["prompt_mask"].sum() + batch["completion_mask"].sum()
        self._total_tokens[mode] += int(self.accelerator.gather(tokens_seen.reshape(1)).sum())

    def _record_loss(
        self, mode: str, loss_mask: torch.Tensor, entropy: torch.Tensor, metrics: dict[str, torch.Tensor]
    ) -> None:
        """Loss-step metrics, averaged over every process (token-weighted where per token)."""
        tokens = loss_mask.sum().float()
        names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
        values = [metrics[n].float() for n in names]
        packed = [*values, (entropy.detach() * loss_mask).sum().float(), tokens]
        if "kl" in metrics:
            packed.append(metrics["kl"].float() * tokens)
        reduced = self.accelerator.reduce(torch.stack(packed), reduction="sum").tolist()
        processes = self.accelerator.num_processes
        m = self._metrics[mode]
        for i, name in enumerate(names):
            m[name].append(reduced[i] / processes)
        m["entropy"].append(reduced[3] / max(reduced[4], 1.0))
        if "kl" in metrics:
            m["kl"].append(reduced[5] / max(reduced[4], 1.0))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        metrics["num_tokens"] = float(self._total_tokens[mode])
        if mode == "train":
            steps = self.state.global_step - self._timing_since_step
            if steps > 0:
                for name, seconds in self._timing.items():
                    metrics[f"timing/{name}"] = seconds / steps
                self._timing = dict.fromkeys(self._timing, 0.0)
                self._timing_since_step = self.state.global_step
        else:
            loss_key = next((k for k in logs if k.endswith("_loss")), "eval_loss")
            prefix = loss_key[: -len("_loss")]
            metrics = {f"{prefix}_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if mode == "train" and self.args.log_completions and self.accelerator.is_main_process and self._last_round:
            _print_completions(self._last_round, self.args.num_completions_to_print, self.state.global_step)

    # ---- saving ---------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            _write_model_card(output_dir or self.args.output_dir, self.model, self._dataset_name, self.args,
                              [getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs])


# ---- reference sync (TR-DPO) ----------------------------------------------------------------


class _SyncReferenceCallback(TrainerCallback):
    """Every ``ref_model_sync_steps`` optimizer steps: ``ref <- alpha * policy + (1 - alpha) * ref``."""

    def __init__(self, trainer: RLOOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.ref_model_sync_steps != 0 or self.trainer.ref_model is None:
            return
        accelerator = self.trainer.accelerator
        policy = dict(accelerator.unwrap_model(self.trainer.model).named_parameters())
        with torch.no_grad():
            for name, ref in accelerator.unwrap_model(self.trainer.ref_model).named_parameters():
                ref.mul_(1.0 - args.ref_model_mixup_alpha).add_(policy[name].to(ref.dtype),
                                                                alpha=args.ref_model_mixup_alpha)


# ---- helpers --------------------------------------------------------------------------------


def _split_round(batch: dict[str, torch.Tensor], steps: int) -> list[dict[str, torch.Tensor]]:
    """Cut a round into ``steps`` consecutive micro-batches, each trimmed to its own longest
    prompt and completion."""
    size = batch["completion_ids"].shape[0] // steps
    parts = []
    for k in range(steps):
        part = {name: value[k * size : (k + 1) * size] for name, value in batch.items()}
        prompt_width = max(int(part["prompt_mask"].sum(dim=1).max()), 1)
        width = max(int(part["completion_mask"].sum(dim=1).max()), 1)
        for name, value in part.items():
            if name in ("prompt_ids", "prompt_mask"):
                part[name] = value[:, value.shape[1] - prompt_width :]
            elif value.dim() == 2:
                part[name] = value[:, :width]
        parts.append(part)
    return parts


def _check_prompts(dataset: Any, split: str, args: RLOOConfig, training: bool) -> None:
    """Every row must have a ``prompt``; a training set must fill at least one round."""
    if dataset is None:
        return
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"RLOOTrainer: the {split} dataset is an IterableDataset (streaming). Online RL samples rounds of "
            "prompts by index: load it without streaming=True."
        )
    fmt = validate_dataset(dataset, expected_kinds=("prompt_only",))
    if fmt.tokenized:
        raise ValueError(
            f"RLOOTrainer: the {split} dataset holds token ids (`prompt_input_ids`) but no `prompt` column. Online "
            "RL renders prompts itself and hands their text to the reward functions: give a `prompt` column of "
            "strings or lists of messages."
        )
    if training:
        needed = args.generation_batch_size // args.num_generations
        if len(dataset) < needed:
            raise ValueError(
                f"RLOOTrainer: the train dataset has {len(dataset)} prompts, but one generation round takes "
                f"{needed} (generation_batch_size={args.generation_batch_size} / num_generations="
                f"{args.num_generations}). Use more prompts, or a smaller per_device_train_batch_size or "
                "steps_per_generation."
            )


def _reward_weights(weights: list[float] | None, count: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(count)
    if len(weights) != count:
        raise ValueError(
            f"RLOOConfig.reward_weights has {len(weights)} values for {count} reward functions; give one weight "
            "per reward function, in the order of `reward_funcs`."
        )
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def _nanmean(x: torch.Tensor) -> float:
    kept = x[~torch.isnan(x)]
    return float(kept.mean()) if kept.numel() else math.nan


def _nanstd(x: torch.Tensor) -> float:
    kept = x[~torch.isnan(x)]
    return float(kept.std()) if kept.numel() > 1 else 0.0


def _vllm_backend(args: RLOOConfig, model_id: str | None, sampling: SamplingParams, main: bool) -> Any:
    """The vLLM backend ``args`` ask for (vLLM is imported when it is built; ``__init__`` has
    already checked that it is installed)."""
    from honelm.generation import VLLMColocateBackend, VLLMServerBackend

    if args.vllm_mode == "server":
        url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        backend = VLLMServerBackend(url, sampling=sampling, max_completion_length=args.max_completion_length,
                                    timeout=args.vllm_server_timeout)
        if main:
            backend.init_weight_sync()
        return backend
    if not model_id:
        raise ValueError(
            "RLOOTrainer: use_vllm=True with vllm_mode='colocate' loads the model into vLLM by its name or path, "
            "and this model has none. Pass the model as a name or path, or save it and load it from disk."
        )
    return VLLMColocateBackend(
        model_id, sampling=sampling, max_completion_length=args.max_completion_length,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization, tensor_parallel_size=args.vllm_tensor_parallel_size,
        max_model_len=args.vllm_max_model_length, enable_sleep_mode=args.vllm_enable_sleep_mode, seed=args.seed,
    )


def _print_completions(round_: dict[str, list[Any]], limit: int | None, step: int) -> None:
    rows = list(zip(round_["prompt"], round_["completion"], round_["reward"], round_["advantage"]))
    rows = rows[:limit] if limit is not None else rows
    print(f"\n[step {step}] {len(rows)} completions of the last round (prompt | completion | reward | advantage)")
    for prompt, completion, reward, advantage in rows:
        print(f"  {_text(prompt)!r:.60} | {_text(completion)!r:.80} | {reward:.3f} | {advantage:+.3f}")


def _text(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def _load_model(model: Any, args: RLOOConfig, quantization_config: Any) -> Any:
    if isinstance(model, str):
        return load_causal_lm(model, _init_kwargs(args.model_init_kwargs, args, quantization_config))
    if args.model_init_kwargs:
        logger.warning("RLOOConfig.model_init_kwargs is ignored for the policy: it is already instantiated.")
    if quantization_config is not None:
        raise ValueError(
            "RLOOTrainer: quantization_config applies when the model is loaded from a name or path; this model is "
            "already instantiated. Pass the name, or quantize the model when you load it."
        )
    return model


def _init_kwargs(kwargs: dict[str, Any] | None, args: RLOOConfig, quantization_config: Any) -> dict[str, Any]:
    out = dict(kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in out:
            raise ValueError(
                "RLOOTrainer: quantization_config is given both as a trainer argument and in model_init_kwargs; "
                "give it once."
            )
        out["quantization_config"] = quantization_config
    if args.trust_remote_code:
        out.setdefault("trust_remote_code", True)
    return out


def _is_peft_model(model: Any) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _wrap_peft(model: Any, peft_config: Any, args: RLOOConfig) -> Any:
    try:
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("RLOOTrainer(peft_config=...) needs peft: pip install 'honelm[peft]'.") from e
    if _is_peft_model(model):
        raise ValueError(
            "RLOOTrainer: the model already has a PEFT adapter and a peft_config was given too. Merge the adapter "
            "(model.merge_and_unload()) before adding a new one, or leave peft_config out to train the existing one."
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    return get_peft_model(model, peft_config)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _dataset_name(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info else None


def _write_model_card(
    output_dir: str, model: Any, dataset_name: str | None, args: RLOOConfig, reward_names: list[str]
) -> None:
    from honelm.version import __version__

    base = getattr(getattr(model, "config", None), "_name_or_path", None) or "unknown"
    peft = " (LoRA adapter)" if hasattr(model, "peft_config") else ""
    kl = "none" if args.beta == 0 else f"beta={args.beta}, in the {'reward' if args.kl_in_reward else 'loss'}"
    card = (
        f"---\nlibrary_name: honelm\ntags:\n- honelm\n- rloo\nbase_model: {base}\n---\n\n"
        f"# {os.path.basename(os.path.abspath(output_dir))}\n\n"
        f"This model{peft} was trained with REINFORCE Leave-One-Out (RLOO) using honelm {__version__}.\n\n"
        f"- Method: RLOO (`num_generations={args.num_generations}`, KL: {kl})\n"
        f"- Rewards: {', '.join(reward_names)}\n"
        f"- Base model: {base}\n"
        f"- Dataset: {dataset_name or 'not recorded'}\n"
        f"- Max completion length: {args.max_completion_length}, learning rate: {args.learning_rate}\n"
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
