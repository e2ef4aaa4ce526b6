"""Detectors of how the run uses the machine.

Metrics read, logged by :class:`~honelm.diagnostics.DiagnosticsCallback` (seconds per
optimizer step and GiB, averaged or maximized over the logging window):

- ``timing/step``: compute time of an optimizer step (all its micro-batches);
- ``timing/data``: time spent waiting for the step's batches;
- ``memory/peak_gib``, ``memory/static_gib`` (weights, optimizer state: what stays allocated
  between steps), ``memory/total_gib``: accelerator memory (CUDA only).

Online-RL trainers log, per optimizer step: ``timing/generation`` (generating completions),
``timing/reward`` (reward functions), ``timing/training`` (forward/backward/optimizer).
"""

from __future__ import annotations

import math
from typing import Any

from ..events import Finding
from ..history import RunContext
from ._common import Thresholds, detector, pct, suggest, suggestions


def _memory(ctx: RunContext, window: int) -> tuple[float, float, float] | None:
    """(peak, static, total) GiB over the last ``window`` logs, or None without memory metrics."""
    peak, total = ctx.history.train("memory/peak_gib"), ctx.history.train("memory/total_gib")
    if len(peak) < window or not total or not total.last > 0:
        return None
    static = ctx.history.train("memory/static_gib")
    return max(peak.tail(window)), (static.last if static else math.nan), total.last


def _batch_that_fits(peak: float, static: float, total: float, batch: int, target: float) -> int | None:
    """The largest power-of-two multiple of ``batch`` whose activations fit ``target`` of memory.

    Activation memory is taken as proportional to the batch: ``peak = static + batch * per_row``.
    """
    per_row = (peak - static) / batch
    if not (per_row > 0 and math.isfinite(static)):
        return None
    fits = (target * total - static) / per_row
    proposed = batch
    while proposed * 2 <= fits:
        proposed *= 2
    return proposed if proposed > batch else None


@detector("SYS_LOW_MEMORY_USE")
def low_memory_use(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["SYS_LOW_MEMORY_USE"]
    window = int(t["min_logs"])
    memory = _memory(ctx, window)
    if memory is None:
        return []
    peak, static, total = memory
    use = peak / total
    if not use < t["max_utilization"]:
        return []
    batch = ctx.config.get("per_device_train_batch_size")
    proposed = _batch_that_fits(peak, static, total, batch, t["target_utilization"]) if isinstance(batch, int) else None
    advice = (f" Try increasing the batch size from {batch} to {proposed}." if proposed else
              " A larger batch (or a longer max_length, or no gradient checkpointing) would use it.")
    accumulation = ctx.config.get("gradient_accumulation_steps")
    fewer_steps = None
    if proposed and isinstance(accumulation, int) and accumulation > 1:
        fewer_steps = suggest(ctx.config, "gradient_accumulation_steps",
                              max(1, round(accumulation * batch / proposed)), "keeps the effective batch size")
    return [Finding(
        "SYS_LOW_MEMORY_USE",
        f"Accelerator memory use peaks at {pct(use)} ({peak:.1f} of {total:.0f} GiB).{advice}",
        evidence={"metric": "memory/peak_gib", "peak_gib": peak, "static_gib": static, "total_gib": total,
                  "utilization": use, "threshold": t["max_utilization"], "target": t["target_utilization"]},
        suggestions=suggestions(
            suggest(ctx.config, "per_device_train_batch_size", proposed,
                    f"fits in about {pct(t['target_utilization'])} of memory, from the measured peak"),
            fewer_steps,
        ),
    )]


@detector("SYS_OOM_RISK")
def oom_risk(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["SYS_OOM_RISK"]
    memory = _memory(ctx, 1)
    if memory is None:
        return []
    peak, _, total = memory
    use = peak / total
    if not use >= t["max_utilization"]:
        return []
    batch = ctx.config.get("per_device_train_batch_size")
    return [Finding(
        "SYS_OOM_RISK",
        f"Peak accelerator memory is {pct(use)} of the total ({peak:.1f} of {total:.0f} GiB): a batch of longer "
        "sequences may run out of memory. Halve the batch and double the accumulation, or turn on gradient "
        "checkpointing.",
        evidence={"metric": "memory/peak_gib", "peak_gib": peak, "total_gib": total, "utilization": use,
                  "threshold": t["max_utilization"]},
        suggestions=suggestions(
            suggest(ctx.config, "gradient_checkpointing", lambda cur: True if cur is False else None,
                    "recompute activations instead of storing them"),
            suggest(ctx.config, "per_device_train_batch_size",
                    lambda cur: cur // 2 if isinstance(cur, int) and cur > 1 else None, "half the activations"),
            suggest(ctx.config, "gradient_accumulation_steps",
                    lambda cur: 2 * cur if isinstance(cur, int) and isinstance(batch, int) and batch > 1 else None,
                    "keeps the effective batch size"),
        ),
    )]


@detector("SYS_DATALOADER_BOUND")
def dataloader_bound(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["SYS_DATALOADER_BOUND"]
    window = int(t["window"])
    data, step = ctx.history.train("timing/data"), ctx.history.train("timing/step")
    # The first log includes starting the data loader (worker processes): leave it out.
    if min(len(data), len(step)) < window + 1:
        return []
    waiting, working = sum(data.tail(window)), sum(step.tail(window))
    share = waiting / (waiting + working) if waiting + working > 0 else 0.0
    if not (share > t["max_fraction"] and waiting / window > t["min_seconds"]):
        return []
    workers = ctx.config.get("dataloader_num_workers")
    return [Finding(
        "SYS_DATALOADER_BOUND",
        f"Steps spend {pct(share)} of their time waiting for data ({waiting / window:.2f} s per step): the accelerator "
        "idles while batches are prepared. Load data in worker processes and tokenize ahead of time.",
        evidence={"metrics": ["timing/data", "timing/step"], "data_seconds": data.tail(window),
                  "step_seconds": step.tail(window), "share": share, "threshold": t["max_fraction"]},
        suggestions=suggestions(
            suggest(ctx.config, "dataloader_num_workers",
                    lambda cur: 4 if not cur else (2 * cur if isinstance(cur, int) else None),
                    "prepare batches in parallel with training"),
            suggest(ctx.config, "dataloader_persistent_workers",
                    lambda cur: True if cur is False and workers else None, "keep workers between epochs"),
        ),
    )]


def _rl_step_seconds(ctx: RunContext, window: int) -> float | None:
    step = ctx.history.train("timing/step")
    if len(step) >= window:
        return sum(step.tail(window))
    parts = [ctx.history.train(f"timing/{k}") for k in ("generation", "reward", "training")]
    if all(len(p) >= window for p in parts):
        return sum(sum(p.tail(window)) for p in parts)
    return None


@detector("SYS_GENERATION_BOUND")
def generation_bound(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["SYS_GENERATION_BOUND"]
    window = int(t["window"])
    generation = ctx.history.train("timing/generation")
    total = _rl_step_seconds(ctx, window)
    if len(generation) < window or not total:
        return []
    share = sum(generation.tail(window)) / total
    if not share > t["max_fraction"]:
        return []
    use_vllm = ctx.config.get("use_vllm")
    remedy = ("Generate with vLLM (use_vllm=True), larger generation batches, or asynchronous generation."
              if not use_vllm else "Use larger generation batches, a separate vLLM server, or asynchronous generation.")
    return [Finding(
        "SYS_GENERATION_BOUND",
        f"Generating completions takes {pct(share)} of each step ({sum(generation.tail(window)) / window:.2f} s of "
        f"{total / window:.2f} s); training waits for it. {remedy}",
        evidence={"metric": "timing/generation", "recent": generation.tail(window), "share": share,
                  "threshold": t["max_fraction"]},
        suggestions=suggestions(
            suggest(ctx.config, "use_vllm", lambda cur: True if cur is False else None, "fast batched generation"),
            suggest(ctx.config, "generation_batch_size",
                    lambda cur: 2 * cur if isinstance(cur, int) and cur > 0 else None,
                    "generate for more steps at once"),
        ),
    )]


@detector("SYS_SLOW_REWARD")
def slow_reward(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["SYS_SLOW_REWARD"]
    window = int(t["window"])
    reward = ctx.history.train("timing/reward")
    total = _rl_step_seconds(ctx, window)
    if len(reward) < window or not total:
        return []
    seconds = sum(reward.tail(window))
    share = seconds / total
    if not (share > t["max_fraction"] and seconds / window > t["min_seconds"]):
        return []
    return [Finding(
        "SYS_SLOW_REWARD",
        f"Reward functions take {pct(share)} of each step ({seconds / window:.2f} s): score completions in batches, "
        "cache repeated work, run slow checks (code execution, API calls) concurrently or asynchronously.",
        evidence={"metric": "timing/reward", "recent": reward.tail(window), "share": share,
                  "threshold": t["max_fraction"]},
    )]


DETECTORS: tuple[Any, ...] = (low_memory_use, oom_risk, dataloader_bound, generation_bound, slow_reward)
