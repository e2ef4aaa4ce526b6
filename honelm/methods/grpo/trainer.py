"""Group Relative Policy Optimization.

For every prompt the policy samples a group of ``num_generations`` completions, reward
functions score them, and each completion's advantage is its reward minus its group's mean
(divided by the group's standard deviation, ``scale_rewards``): no value model is needed
(Shao et al. 2024, DeepSeekMath). The policy then minimizes PPO's clipped surrogate of the
advantage over the completion tokens (``loss_type`` picks the variant of ``loss.py``),
optionally plus ``beta`` times a k3 estimate of the KL divergence to a frozen reference
model. One generation round feeds ``steps_per_generation`` micro-batches, ``num_iterations``
times over, with the old log-probs computed once per round. Log-probs of the completion
tokens come from the final hidden states through the chunked LM-head kernels of
:mod:`honelm.ops`, never through the full ``(tokens, vocab)`` logits. Rewards and advantages
are computed over the whole generation batch of all processes, so a prompt's group may span
processes.

    honelm grpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward
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
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, Trainer, TrainerCallback, set_seed

from honelm.data import validate_dataset
from honelm.diagnostics.callback import attach_diagnostics
from honelm.generation import (
    SamplingParams,
    TransformersBackend,
    rollout,
    rollout_from_dict,
    tool_schema,
)
from honelm.models import last_hidden_states, load_causal_lm
from honelm.ops import lm_head_weight_and_bias, masked_selective_logps
from honelm.rewards import (
    aggregate_rewards,
    compute_rewards,
    load_reward_funcs,
    reward_func_name,
)

from .config import GRPOConfig
from .loss import group_advantages, grpo_loss, sampling_correction, top_entropy_mask

logger = logging.getLogger(__name__)

# Dataset columns not passed to reward functions: the prompt is passed as `prompts`, and a
# `completion` column would be mistaken for the generated completions.
_NOT_REWARD_COLUMNS = ("prompt", "completion", "completion_ids")
_TIMINGS = ("generation", "reward", "training")


def _identity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


# ---- sampling prompts -----------------------------------------------------------------------


class RepeatSampler(Sampler[int]):
    """Dataset indices in the order a GRPO run consumes them (the global order of all processes).

    Prompts are taken in rounds of ``prompts_per_round`` (one generation round); every index
    is yielded ``num_generations`` times in a row (the group), and every round is yielded
    ``repeats`` times (once per micro-batch that the round feeds, so that the Trainer counts
    micro-batches, not rounds). An incomplete last round is dropped. With ``shuffle`` the order
    is a new permutation every epoch, a function of ``seed`` and the epoch only, hence the
    same in every process.
    """

    def __init__(
        self,
        num_rows: int,
        num_generations: int,
        prompts_per_round: int,
        repeats: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if num_rows < prompts_per_round:
            raise ValueError(
                f"The dataset has {num_rows} prompts, fewer than the {prompts_per_round} prompts of one generation "
                "round (generation_batch_size / num_generations). Add prompts, or lower generation_batch_size."
            )
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_round, self.repeats = prompts_per_round, repeats
        self.shuffle, self.seed = shuffle, seed
        self.epoch: int | None = None
        self._iterations = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch if self.epoch is not None else self._iterations
        self._iterations += 1
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        size = self.prompts_per_round
        for start in range(0, self.num_rows - size + 1, size):
            round_ = order[start : start + size]
            for _ in range(self.repeats):
                for index in round_:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        return (self.num_rows // self.prompts_per_round) * self.prompts_per_round * self.num_generations * self.repeats


# ---- the trainer ----------------------------------------------------------------------------


class GRPOTrainer(Trainer):
    """Trainer for Group Relative Policy Optimization (see the module docstring and ``docs/grpo.md``).

    Args:
        model: A model name or local path (loaded with ``args.model_init_kwargs``, dtype
            ``"auto"``) or an instantiated causal LM (or ``peft.PeftModel``).
        reward_funcs: A reward function ``f(prompts, completions, completion_ids, **columns)
            -> list[float | None]`` (sync or ``async``), a reward model (name, path or
            sequence-classification model), or a list of them.
        args: A :class:`GRPOConfig`; defaults to one with ``output_dir="<model>-GRPO"``.
        train_dataset, eval_dataset: Prompt-only datasets: a ``prompt`` column of strings or of
            message lists; every other column is passed to the reward functions.
            ``eval_dataset`` may be a dict of named datasets.
        processing_class: The policy's tokenizer; loaded from ``model`` when omitted.
        reward_processing_classes: Tokenizers of the reward models (one, or one per reward
            function with ``None`` for functions); loaded from the models when omitted.
        callbacks, optimizers: As in ``transformers.Trainer``.
        peft_config: A ``peft`` config (e.g. ``LoraConfig``): only the adapters train; with
            ``beta > 0`` the reference is the model with its adapter disabled.
        tools: Python functions the model may call in multi-turn rollouts (conversational
            prompts); their results are fed back and masked from the loss.
        rollout_func: ``rollout_func(prompts, trainer) -> dict`` replacing generation (see
            :data:`honelm.generation.RolloutFunc`).
    """

    _tag_names = ["honelm", "grpo"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        tools: Sequence[Callable[..., Any]] | None = None,
        rollout_func: Callable[[list[Any], Any], dict[str, Any]] | None = None,
    ) -> None:
        model_path = model if isinstance(model, str) else None
        model_id = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if args is None:
            name = (model_id or "model").rstrip("/").split("/")[-1]
            args = GRPOConfig(output_dir=f"{name}-GRPO")
        elif not isinstance(args, GRPOConfig):
            raise TypeError(f"GRPOTrainer: `args` must be a GRPOConfig, got {type(args).__name__}.")
        self._setup_rewards(reward_funcs, reward_processing_classes, args)
        if args.use_vllm:
            from honelm.generation.vllm_backend import require_vllm

            require_vllm()
        if isinstance(model, str):
            model = load_causal_lm(model, _init_kwargs(args))
        elif args.model_init_kwargs:
            logger.warning("GRPOConfig.model_init_kwargs is ignored for the policy: it is already instantiated.")
        if processing_class is None:
            if model_id is None:
                raise ValueError("GRPOTrainer: pass `processing_class` (the tokenizer); the model has no name to load it from.")
            processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model, ref_model = self._models(model, model_path, args, peft_config)
        self.tools = list(tools) if tools else None
        for tool in self.tools or ():
            tool_schema(tool)  # a tool without annotations fails here, naming the tool and parameter
        self.rollout_func = rollout_func
        _check_prompts(train_dataset, "train")
        for split, dataset in _named(eval_dataset):
            _check_prompts(dataset, split)
        self._dataset_name = _dataset_name(train_dataset)

        output_dir_existed = os.path.isdir(args.output_dir)
        super().__init__(
            model=model,
            args=args,
            data_collator=_identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # compute_loss returns a per-micro-batch loss; the Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True) if ref_model is not None else None
        for fn in self.reward_funcs:
            if isinstance(getattr(fn, "model", None), torch.nn.Module):
                fn.model.to(self.accelerator.device)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_tokens = {"train": 0, "eval": 0}
        self._timing = dict.fromkeys((*_TIMINGS, "steps"), 0.0)
        self._buffered: list[dict[str, Any]] | None = None
        self._step = 0  # micro-batches trained so far in this run
        self._synced_step = 0  # global step whose weights the vLLM engine holds
        self._last_samples: list[dict[str, Any]] = []
        self._tokenizer = tokenizer
        self.backend = self._build_backend(model_path or model_id)
        self.add_callback(_StepTimer(self))
        if args.sync_ref_model:
            self.add_callback(_SyncReferenceCallback(self))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        # Runtime diagnostics (reward spread, entropy, clipping, lengths, timings); prompt-only
        # data has no targets for the pre-flight checks to read.
        self.diagnostics = attach_diagnostics(self, "grpo", output_dir_existed=output_dir_existed)

    # ---- setup ----------------------------------------------------------------------------

    def _models(self, model: Any, model_path: str | None, args: GRPOConfig, peft_config: Any) -> tuple[Any, Any]:
        """The policy (wrapped with PEFT when asked) and the separate reference model, or None."""
        peft = peft_config is not None or _is_peft_model(model)
        if args.sync_ref_model and (peft or args.beta == 0.0):
            raise ValueError(
                "GRPOConfig.sync_ref_model=True needs a separate reference model to update: set beta > 0 and train "
                "without PEFT (with PEFT the reference is the model with its adapter disabled)."
            )
        ref_model = None
        if args.beta != 0.0 and not peft:
            if model_path is not None:  # load it again, as the policy was loaded
                ref_model = load_causal_lm(model_path, _init_kwargs(args))
            else:
                ref_model = copy.deepcopy(model)
        if peft_config is not None:
            model = _wrap_peft(model, peft_config, args)
        if args.disable_dropout:
            _disable_dropout(model)
        if ref_model is not None:
            ref_model.requires_grad_(False)
            ref_model.eval()
            if args.disable_dropout:
                _disable_dropout(ref_model)
        return model, ref_model

    def _setup_rewards(self, reward_funcs: Any, reward_processing_classes: Any, args: GRPOConfig) -> None:
        """Reward functions as callables (reward models loaded once) and their metric names."""
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError(
                "GRPOTrainer needs `reward_funcs`: a reward function f(prompts, completions, **kwargs) -> "
                "list[float], a reward model, or a list of them."
            )
        self.reward_funcs = load_reward_funcs(
            reward_funcs, reward_processing_classes, model_init_kwargs=args.model_init_kwargs
        )
        self.reward_func_names = [reward_func_name(f) for f in self.reward_funcs]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"GRPOConfig.reward_weights has {len(args.reward_weights)} values for {len(self.reward_funcs)} reward "
                f"functions ({', '.join(self.reward_func_names)}); give one weight per function."
            )

    def _sampling_params(self) -> SamplingParams:
        args = self.args
        values = {
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None,
            "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        }
        values.update(args.generation_kwargs or {})
        return SamplingParams(**values)

    def _build_backend(self, model_name: str | None) -> Any:
        """The generation backend: the policy in process, or vLLM (``use_vllm``)."""
        args, sampling = self.args, self._sampling_params()
        if not args.use_vllm:
            return TransformersBackend(
                self.accelerator.unwrap_model(self.model), self._tokenizer, sampling,
                max_completion_length=args.max_completion_length,
            )
        from honelm.generation.vllm_backend import (
            VLLMColocateBackend,
            VLLMServerBackend,
        )

        if args.vllm_mode == "server":
            if not self.accelerator.is_main_process:
                return None  # the main process generates for everyone
            url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
            return VLLMServerBackend(
                url, sampling=sampling, max_completion_length=args.max_completion_length, timeout=args.vllm_server_timeout
            )
        if not model_name or not (os.path.isdir(model_name) or "/" in model_name):
            raise ValueError(
                "GRPOConfig.use_vllm with vllm_mode='colocate' loads the model in vLLM from its name or path, but this "
                f"model has none ({model_name!r}). Pass the model as a name or path, or save it and pass the directory."
            )
        return VLLMColocateBackend(
            model_name,
            sampling=sampling,
            max_completion_length=args.max_completion_length,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            max_model_len=args.vllm_max_model_length,
            enable_sleep_mode=args.vllm_enable_sleep_mode,
            seed=args.seed + self.accelerator.process_index,
        )

    # ---- data -----------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """Batches of ``per_device_train_batch_size * steps_per_generation`` prompt rows: one
        generation round of this process, yielded once per micro-batch it feeds."""
        if self.train_dataset is None:
            raise ValueError("GRPOTrainer.train() needs a train_dataset.")
        args = self.args
        sampler = RepeatSampler(
            len(self.train_dataset),
            args.num_generations,
            args.generation_batch_size // args.num_generations,
            repeats=args.steps_per_generation * args.num_iterations,
            shuffle=args.shuffle_dataset,
            seed=args.seed,
        )
        return self._loader(self.train_dataset, args.per_device_train_batch_size * args.steps_per_generation, sampler)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("GRPOTrainer.evaluate() needs an eval_dataset.")
        if isinstance(dataset, dict):
            raise ValueError("Pass one eval dataset (or its name) to get_eval_dataloader.")
        generations = self.args.num_generations_eval or self.args.num_generations
        batch = self.args.per_device_eval_batch_size * self.accelerator.num_processes
        if batch % generations:
            raise ValueError(
                f"GRPOTrainer.evaluate: the evaluation batch of {batch} completions (per_device_eval_batch_size x "
                f"processes) must be a multiple of num_generations_eval={generations}."
            )
        per_round = batch // generations
        sampler = RepeatSampler(len(dataset), generations, min(per_round, len(dataset)), shuffle=False)
        return self._loader(dataset, self.args.per_device_eval_batch_size, sampler)

    def _loader(self, dataset: Any, batch_size: int, sampler: Sampler[int]) -> DataLoader:
        loader = DataLoader(
            dataset.with_format(None) if hasattr(dataset, "with_format") else dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=_identity,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        return dataset  # every column goes to the reward functions

    def floating_point_ops(self, inputs: Any) -> int:
        return 0  # batches are prompt rows, not token tensors

    # ---- one generation round --------------------------------------------------------------

    def _prepare_inputs(self, rows: Any) -> dict[str, Any]:  # type: ignore[override]
        """Train: generate and score a new round every ``steps_per_generation * num_iterations``
        micro-batches, then hand out its micro-batches in turn. Eval: generate for the batch."""
        if not self.model.training:
            return self._generate_and_score(rows, "eval")[0]
        args = self.args
        if self._buffered is None or self._step % (args.steps_per_generation * args.num_iterations) == 0:
            self._buffered = self._generate_and_score(rows, "train")
        batch = self._buffered[self._step % args.steps_per_generation]
        self._step += 1
        return batch

    def _generate_and_score(self, rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
        """Roll out, score, compute advantages (over all processes) and the fixed per-token
        quantities (old, reference and sampler log-probs) of one generation batch; return its
        micro-batches."""
        device = self.accelerator.device
        prompts = [row["prompt"] for row in rows]
        columns = {k: [row.get(k) for row in rows] for k in rows[0] if k not in _NOT_REWARD_COLUMNS}
        start = time.perf_counter()
        out = self._rollout(prompts)
        generated = time.perf_counter()
        rewards = compute_rewards(
            self.reward_funcs, prompts, out.completions, out.completion_ids, {**columns, **out.extra},
            trainer_state=self.state,
        )
        if mode == "train":
            self._timing["generation"] += generated - start
            self._timing["reward"] += time.perf_counter() - generated
        batch = out.to_tensors(self._tokenizer.pad_token_id, device)
        loss_mask = batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]
        if self.args.mask_truncated_completions:
            loss_mask = loss_mask * (~batch["truncated"]).unsqueeze(1).long()
        data = {
            "prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
            "completion_ids": batch["completion_ids"], "completion_mask": batch["completion_mask"],
            "loss_mask": loss_mask, "sampling_logps": batch["logps"],
        }
        data["advantages"] = self._advantages(rewards.rewards_per_func.to(device), mode)
        self._record_rollout(mode, out, batch)
        size = self.args.per_device_train_batch_size if mode == "train" else len(rows)
        chunks = [_trim(_slice(data, i, i + size)) for i in range(0, len(rows), size)]
        self._add_fixed_logps(chunks, mode)
        self._add_num_items(chunks, mode)
        self._keep_samples(prompts, out.completions, rewards.rewards_per_func, data["advantages"])
        return chunks

    def _rollout(self, prompts: list[Any]) -> Any:
        """Completions of ``prompts`` (already repeated ``num_generations`` times) as a RolloutOutput."""
        tokenizer = self._tokenizer
        if self.rollout_func is not None:
            return rollout_from_dict(self.rollout_func(prompts, self), tokenizer, prompts=prompts)
        args = self.args
        kwargs = {
            "max_prompt_length": args.max_prompt_length, "tools": self.tools,
            "max_tool_calling_iterations": args.max_tool_calling_iterations, "tool_timeout": args.tool_timeout,
            "chat_template_kwargs": args.chat_template_kwargs,
        }
        if args.use_vllm:
            return self._vllm_rollout(prompts, kwargs)
        self.backend.model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            return rollout(self.backend, prompts, tokenizer, **kwargs)

    def _advantages(self, rewards_per_func: torch.Tensor, mode: str) -> torch.Tensor:
        """This process's advantages ``(n,)`` from the rewards of every process ``(N, K)``, and the reward metrics."""
        args = self.args
        generations = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        local = rewards_per_func.shape[0]
        everything = self.accelerator.gather(rewards_per_func)  # (N, K), processes in order
        weights = torch.tensor(args.reward_weights or [1.0] * everything.shape[1], device=everything.device)
        total = (everything * weights).nansum(dim=1)  # (N,)
        advantages, stats = group_advantages(total, generations, args.scale_rewards)
        if args.multi_objective_aggregation == "normalize_then_sum":
            advantages = aggregate_rewards(
                everything, weights, aggregation="normalize_then_sum", num_generations=generations,
                scale_rewards=args.scale_rewards,
            )
        metrics = self._metrics[mode]
        for k, name in enumerate(self.reward_func_names):
            column = everything[:, k]
            kept = column[~torch.isnan(column)]
            metrics[f"rewards/{name}/mean"].append(kept.mean().item() if kept.numel() else math.nan)
            metrics[f"rewards/{name}/std"].append(kept.std().item() if kept.numel() > 1 else 0.0)
        metrics["reward"].append(total.mean().item())
        metrics["reward_std"].append(stats["reward_std"].item())
        metrics["frac_reward_zero_std"].append(stats["frac_reward_zero_std"].item())
        start = self.accelerator.process_index * local
        return advantages[start : start + local]

    def _record_rollout(self, mode: str, out: Any, batch: dict[str, torch.Tensor]) -> None:
        """Completion-length, token and tool metrics of the whole generation batch."""
        gather = self.accelerator.gather
        lengths = gather(batch["completion_mask"].sum(1))  # (N,)
        truncated = gather(batch["truncated"].long()).bool()  # (N,)
        tokens = gather(batch["prompt_mask"].sum() + batch["completion_mask"].sum()).sum().item()
        self._total_tokens[mode] += int(tokens)
        if mode == "train":
            self.state.num_input_tokens_seen = (self.state.num_input_tokens_seen or 0) + int(tokens)
        metrics = self._metrics[mode]
        lengths = lengths.float()
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(truncated.float().mean().item())
        terminated = lengths[~truncated] if (~truncated).any() else lengths.new_zeros(1)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())
        if self.tools or out.tool_call_counts is not None:
            device = lengths.device
            calls = gather(torch.tensor([sum(out.tool_call_counts or [])], device=device)).sum().item()
            failures = gather(torch.tensor([sum(out.tool_failure_counts or [])], device=device)).sum().item()
            metrics["tools/call_frequency"].append(calls / lengths.numel())
            metrics["tools/failure_frequency"].append(failures / calls if calls else 0.0)

    @torch.no_grad()
    def _add_fixed_logps(self, chunks: list[dict[str, Any]], mode: str) -> None:
        """Per-token log-probs that stay fixed while a round is trained on, computed once:
        the old policy's (when the round outlives an optimizer step, or for the sampler
        correction), the reference model's (``beta > 0``), and the correction weights."""
        args = self.args
        correct = args.use_vllm and args.vllm_importance_sampling_correction
        stale = mode == "train" and args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations)
        for chunk in chunks:
            if stale or correct:
                chunk["old_logps"], _ = self._completion_logps(self.model, chunk)
            if args.beta != 0.0:
                with self._reference() as reference:
                    chunk["ref_logps"], _ = self._completion_logps(reference, chunk)
            if correct:
                self._correction_weights(chunk, mode)

    def _correction_weights(self, chunk: dict[str, Any], mode: str) -> None:
        """``is_weights``: pi_trainer / pi_sampler of the sampled tokens, truncated or masked."""
        args = self.args
        mask = chunk["loss_mask"]
        clip_max = args.vllm_importance_sampling_clip_max
        weights, stats = sampling_correction(
            chunk["old_logps"], chunk["sampling_logps"], mask, args.vllm_importance_sampling_mode,
            args.vllm_importance_sampling_clip_min or 0.0, math.inf if clip_max is None else clip_max,
        )
        chunk["is_weights"] = weights
        ratio = stats["ratio"]
        keep = mask.bool() if ratio.shape == mask.shape else mask.bool().any(dim=1, keepdim=True)
        values = ratio[keep] if keep.any() else ratio.new_ones(1)
        gap = (chunk["old_logps"] - chunk["sampling_logps"]).abs()[mask.bool()]
        gap = gap if gap.numel() else gap.new_zeros(1)
        metrics, gather = self._metrics[mode], self.accelerator.gather
        metrics["sampling/importance_sampling_ratio/min"].append(gather(values.min().reshape(1)).min().item())
        metrics["sampling/importance_sampling_ratio/mean"].append(gather(values.mean().reshape(1)).mean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(gather(values.max().reshape(1)).max().item())
        metrics["sampling/sampling_logp_difference/mean"].append(gather(gap.mean().reshape(1)).mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(gather(gap.max().reshape(1)).max().item())

    def _add_num_items(self, chunks: list[dict[str, Any]], mode: str) -> None:
        """``num_items`` of each micro-batch, so that the ``dapo``/``cispo`` loss of an optimizer
        step is its tokens' summed loss over the counted tokens of the step on every process."""
        counts = torch.stack([c["loss_mask"].sum() for c in chunks]).float()  # (C,)
        counts = self.accelerator.gather(counts).view(self.accelerator.num_processes, -1).sum(0)  # (C,) global
        processes = self.accelerator.num_processes
        if mode == "eval":
            chunks[0]["num_items"] = counts[0] / processes
            return
        accumulation = self.args.gradient_accumulation_steps
        aligned = len(chunks) % accumulation == 0
        for i, chunk in enumerate(chunks):
            if aligned:  # the micro-batches of one optimizer step: [k * GA, (k + 1) * GA)
                group = counts[(i // accumulation) * accumulation : (i // accumulation + 1) * accumulation]
                chunk["num_items"] = group.sum() / (processes * accumulation)
            else:  # a step spans rounds: use the round's tokens per micro-batch
                chunk["num_items"] = counts.sum() / (processes * len(chunks))

    def _keep_samples(self, prompts: list[Any], completions: list[Any], rpf: torch.Tensor, adv: torch.Tensor) -> None:
        if not self.args.log_completions:
            return
        self._last_samples = [
            {"prompt": p, "completion": c, "rewards": dict(zip(self.reward_func_names, r)), "advantage": a}
            for p, c, r, a in zip(prompts, completions, rpf.tolist(), adv.tolist())
        ]

    # ---- vLLM -----------------------------------------------------------------------------

    def _vllm_rollout(self, prompts: list[Any], kwargs: dict[str, Any]) -> Any:
        from accelerate.utils import broadcast_object_list, gather_object

        tokenizer = self._tokenizer
        if self.state.global_step != self._synced_step:
            self._sync_vllm_weights()
            self._synced_step = self.state.global_step
        if self.args.vllm_mode == "colocate":
            self.backend.wake_up()
            try:
                return rollout(self.backend, prompts, tokenizer, **kwargs)
            finally:
                self.backend.sleep()
        everything = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
        parts: list[Any] = [None]
        if self.accelerator.is_main_process:
            out = rollout(self.backend, everything, tokenizer, **kwargs)
            n = len(prompts)
            parts = [[out.select(range(k * n, (k + 1) * n)) for k in range(self.accelerator.num_processes)]]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(parts, from_process=0)
        return parts[0][self.accelerator.process_index]

    @torch.no_grad()
    def _sync_vllm_weights(self) -> None:
        """Copy the policy's current weights into the vLLM engine (PEFT: merged adapters)."""
        from honelm.generation.vllm_backend import named_weights_for_sync

        model = self.accelerator.unwrap_model(self.model)
        merged = _is_peft_model(model)
        if merged:
            model.merge_adapter()
        try:
            if self.args.vllm_mode == "colocate":
                self.backend.load_weights(named_weights_for_sync(model))
            elif self.accelerator.is_main_process:
                if self.backend._group is None:
                    self.backend.init_weight_sync(master_port=self.args.vllm_group_port)
                self.backend.load_weights(named_weights_for_sync(model))
        finally:
            if merged:
                model.unmerge_adapter()
        self.accelerator.wait_for_everyone()

    # ---- log-probs and loss ---------------------------------------------------------------

    def _completion_logps(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies ``(B, T)`` of the completion tokens under ``model`` at the
        sampling temperature, only where ``loss_mask`` is set (0 elsewhere)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P + T)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P + T)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions start at 0
        hidden, _ = last_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        start, width = batch["prompt_ids"].shape[1] - 1, batch["completion_ids"].shape[1]
        hidden = hidden[:, start : start + width]  # (B, T, H): position t predicts completion token t
        weight, bias = lm_head_weight_and_bias(self.accelerator.unwrap_model(model))
        mask = batch["loss_mask"].bool()
        if not mask.any():  # nothing to train on: zeros that still reach every parameter
            zero = (hidden.sum() + weight.sum()) * 0.0
            return zero.expand(mask.shape).float(), zero.expand(mask.shape).float()
        with self.accelerator.autocast():
            logps, entropy = masked_selective_logps(
                hidden, weight, batch["completion_ids"], mask, bias, temperature=self.args.temperature,
                return_entropy=True,
            )
        return logps, entropy

    @contextlib.contextmanager
    def _reference(self) -> Iterator[Any]:
        """The reference policy: the frozen copy, or the model with its PEFT adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not _is_peft_model(unwrapped):
            raise RuntimeError("beta > 0 needs a reference model, and none was set up.")
        with unwrapped.disable_adapter():
            yield self.model

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if return_outputs:
            raise ValueError("GRPOTrainer.compute_loss does not return model outputs.")
        mode = "train" if model.training else "eval"
        args = self.args
        logps, entropy = self._completion_logps(model, inputs)
        loss_mask = inputs["loss_mask"]
        weights = inputs.get("is_weights")
        if args.top_entropy_quantile < 1.0:
            keep = top_entropy_mask(entropy, loss_mask, args.top_entropy_quantile)  # (B, T)
            weights = keep if weights is None else weights * keep
        loss, metrics = grpo_loss(
            logps,
            inputs.get("old_logps"),
            inputs["advantages"],
            loss_mask,
            loss_type=args.loss_type,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            delta=args.delta,
            importance_sampling_level=args.importance_sampling_level,
            beta=args.beta,
            ref_logps=inputs.get("ref_logps"),
            max_completion_length=args.max_completion_length,
            num_items=inputs["num_items"],
            token_weights=weights,
            entropy=entropy if args.entropy_coef else None,
            entropy_coef=args.entropy_coef,
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
        )
        self._record_loss(mode, metrics, entropy, loss_mask)
        return loss

    def _record_loss(self, mode: str, metrics: dict[str, torch.Tensor], entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """This micro-batch's loss metrics over all processes (one gather): per-token means are
        weighted by each process's token count, ``policy_loss`` is averaged like the loss."""
        per_token = [k for k in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
                     if k in metrics]
        mask = mask.float()
        count = mask.sum()
        values = [count, (entropy.detach().float() * mask).sum(), metrics["policy_loss"].float(),
                  *(metrics[k].float() * count for k in per_token), *(metrics[k].float() for k in per_token)]
        table = self.accelerator.gather(torch.stack(values).reshape(1, -1))  # (processes, 3 + 2k)
        total = table[:, 0].sum().clamp(min=1)
        out = self._metrics[mode]
        out["entropy"].append((table[:, 1].sum() / total).item())
        out["policy_loss"].append(table[:, 2].mean().item())
        k = len(per_token)
        for i, key in enumerate(per_token):
            out[key].append((table[:, 3 + i].sum() / total).item())
        local = {key: table[:, 3 + k + i] for i, key in enumerate(per_token)}
        out["clip_ratio/low_min"].append(local["clip_ratio/low_mean"].min().item())
        out["clip_ratio/high_max"].append(local["clip_ratio/high_mean"].max().item())

    def prediction_step(
        self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, None, None]:
        batch = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    # ---- logging and saving ---------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: _nanmean(v) for k, v in self._metrics[mode].items() if v}
        metrics["num_tokens"] = float(self._total_tokens[mode])
        if mode == "train" and self._timing["steps"]:
            for name in _TIMINGS:
                metrics[f"timing/{name}"] = self._timing[name] / self._timing["steps"]
            self._timing = dict.fromkeys(self._timing, 0.0)
        if mode == "eval":
            loss_key = next((k for k in logs if k.endswith("_loss")), "eval_loss")
            prefix = loss_key[: -len("_loss")]
            metrics = {f"{prefix}_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if self.args.log_completions and mode == "train" and self._last_samples:
            if self.is_world_process_zero():
                limit = self.args.num_completions_to_print or 8
                print(_samples_table(self._last_samples, limit, self.state.global_step))
            self._last_samples = []  # printed once, at the first log after its round

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._buffered = None  # a (resumed) run starts with a fresh generation round
        return super().train(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            _write_model_card(output_dir or self.args.output_dir, self.model, self._dataset_name, self.args)


# ---- callbacks ------------------------------------------------------------------------------


class _StepTimer(TrainerCallback):
    """Wall time of each optimizer step; what generation and rewards did not take is training."""

    def __init__(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer
        self._start = 0.0
        self._spent = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._step = state.global_step * args.gradient_accumulation_steps

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        timing = self.trainer._timing
        self._start, self._spent = time.perf_counter(), timing["generation"] + timing["reward"]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        timing = self.trainer._timing
        elapsed = time.perf_counter() - self._start
        timing["training"] += max(elapsed - (timing["generation"] + timing["reward"] - self._spent), 0.0)
        timing["steps"] += 1


class _SyncReferenceCallback(TrainerCallback):
    """TR-DPO style reference refresh: every ``ref_model_sync_steps`` optimizer steps,
    ``ref <- alpha * policy + (1 - alpha) * ref`` with ``alpha = ref_model_mixup_alpha``."""

    def __init__(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer

    @torch.no_grad()
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.ref_model_sync_steps or self.trainer.ref_model is None:
            return
        unwrap = self.trainer.accelerator.unwrap_model
        policy = dict(unwrap(self.trainer.model).named_parameters())
        for name, ref in unwrap(self.trainer.ref_model).named_parameters():
            ref.mul_(1.0 - args.ref_model_mixup_alpha).add_(policy[name].to(ref.dtype), alpha=args.ref_model_mixup_alpha)


# ---- helpers --------------------------------------------------------------------------------


def _nanmean(values: list[float]) -> float:
    """Mean of the values logged since the last log, ignoring NaN (a reward function that
    applied to no sample of a round); NaN when nothing else is left."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _slice(data: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: v[start:stop] for k, v in data.items()}


def _trim(chunk: dict[str, Any]) -> dict[str, Any]:
    """Drop the padding columns this micro-batch does not need (prompts are left-padded,
    completions right-padded), keeping at least one column of each."""
    prompt_width = max(int(chunk["prompt_mask"].sum(1).max()), 1)
    completion_width = max(int(chunk["completion_mask"].sum(1).max()), 1)
    out = dict(chunk)
    for key in ("prompt_ids", "prompt_mask"):
        out[key] = chunk[key][:, chunk[key].shape[1] - prompt_width :]
    for key in ("completion_ids", "completion_mask", "loss_mask", "sampling_logps"):
        out[key] = chunk[key][:, :completion_width]
    return out


def _check_prompts(dataset: Any, split: str) -> None:
    """A prompt-only dataset (``prompt`` column of strings or messages), every row checked."""
    if dataset is None:
        return
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"GRPOTrainer: the {split} dataset is an IterableDataset; GRPO samples prompts in groups and needs a "
            "map-style dataset. Load it without streaming (or `Dataset.from_list(list(stream.take(n)))`)."
        )
    columns = list(getattr(dataset, "column_names", None) or [])
    if "prompt" not in columns:
        raise ValueError(
            f"GRPOTrainer: the {split} dataset has columns {columns} but no 'prompt' column. GRPO needs prompt-only "
            "data: a 'prompt' column of strings or of message lists ([{'role': 'user', 'content': ...}]); rename "
            "your prompt column to 'prompt'. Other columns are passed to the reward functions."
        )
    validate_dataset(dataset.select_columns(["prompt"]), expected_kinds=("prompt_only",))


def _named(dataset: Any) -> list[tuple[str, Any]]:
    if dataset is None:
        return []
    if isinstance(dataset, dict):
        return [(f"eval/{k}", v) for k, v in dataset.items()]
    return [("eval", dataset)]


def _init_kwargs(args: GRPOConfig) -> dict[str, Any]:
    out = dict(args.model_init_kwargs or {})
    if args.trust_remote_code:
        out.setdefault("trust_remote_code", True)
    return out


def _is_peft_model(model: Any) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _wrap_peft(model: Any, peft_config: Any, args: GRPOConfig) -> Any:
    try:
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("GRPOTrainer(peft_config=...) needs peft: pip install 'honelm[peft]'.") from e
    if _is_peft_model(model):
        raise ValueError(
            "GRPOTrainer: the model already has a PEFT adapter and a peft_config was given too. Merge the adapter "
            "(model.merge_and_unload()) before adding a new one, or leave peft_config out to train the existing one."
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    set_seed(args.seed)  # the adapter's random initialization follows the seed
    return get_peft_model(model, peft_config)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _samples_table(samples: list[dict[str, Any]], limit: int, step: int) -> str:
    def short(value: Any, width: int) -> str:
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            value = " | ".join(str(m.get("content", "")) for m in value)
        text = " ".join(str(value).split())
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = [f"completions at step {step}:"]
    for s in samples[:limit]:
        rewards = ", ".join(f"{k}={v:.3g}" for k, v in s["rewards"].items())
        lines.append(f"  {short(s['prompt'], 40):<40} -> {short(s['completion'], 60):<60} [{rewards}; adv {s['advantage']:+.2f}]")
    return "\n".join(lines)


def _dataset_name(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info else None


def _write_model_card(output_dir: str, model: Any, dataset_name: str | None, args: GRPOConfig) -> None:
    from honelm.version import __version__

    base = getattr(getattr(model, "config", None), "_name_or_path", None) or "unknown"
    peft = " (LoRA adapter)" if hasattr(model, "peft_config") else ""
    card = (
        f"---\nlibrary_name: honelm\ntags:\n- honelm\n- grpo\nbase_model: {base}\n---\n\n"
        f"# {os.path.basename(os.path.abspath(output_dir))}\n\n"
        f"This model{peft} was trained with Group Relative Policy Optimization (GRPO) using honelm {__version__}.\n\n"
        f"- Method: GRPO (`loss_type={args.loss_type}`, `beta={args.beta}`, `num_generations={args.num_generations}`)\n"
        f"- Base model: {base}\n"
        f"- Dataset: {dataset_name or 'not recorded'}\n"
        f"- Max completion length: {args.max_completion_length}, learning rate: {args.learning_rate}\n"
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
