"""Synthetic metric streams (log histories as in trainer_state.json) for the detector tests.

Healthy streams imitate what a working run of each method logs; the failing ones each show
one failure. Everything is deterministic (a seeded RNG).
"""

from __future__ import annotations

import math
import random
from typing import Any

Entry = dict[str, Any]


def _noise(rng: random.Random, scale: float) -> float:
    return rng.uniform(-scale, scale)


def schedule(step: int, steps: int, peak: float = 2e-5, warmup: int = 5) -> float:
    if step <= warmup:
        return peak * step / warmup
    return peak * (1 - (step - warmup) / max(1, steps - warmup))


def sft_healthy(steps: int = 200, *, seed: int = 0, eval_every: int = 50, cuda: bool = False) -> list[Entry]:
    """Loss decaying with noise, steady gradient norms, falling eval loss, CPU timings."""
    rng = random.Random(seed)
    history: list[Entry] = []
    for step in range(1, steps + 1):
        loss = 0.6 + 2.0 * math.exp(-step / 40) + _noise(rng, 0.08)
        entry = {
            "loss": loss, "grad_norm": 1.2 + _noise(rng, 0.4), "learning_rate": schedule(step, steps),
            "mean_token_accuracy": 0.9 - 0.4 * math.exp(-step / 40), "entropy": 1.0 + 1.5 * math.exp(-step / 40),
            "num_tokens": 512.0 * step, "epoch": step / 100, "timing/step": 0.2 + _noise(rng, 0.02),
            "timing/data": 0.004 + _noise(rng, 0.002), "step": step,
        }
        if cuda:
            entry.update({"memory/peak_gib": 60 + _noise(rng, 1), "memory/static_gib": 30.0, "memory/total_gib": 80.0,
                          "memory/reserved_gib": 62.0})
        history.append(entry)
        if eval_every and step % eval_every == 0:
            history.append({"eval_loss": 0.7 + 2.0 * math.exp(-step / 40), "eval_mean_token_accuracy": 0.8,
                            "eval_runtime": 1.0, "epoch": step / 100, "step": step})
    history.append({"train_runtime": 100.0, "train_loss": 1.0, "epoch": steps / 100, "step": steps})
    return history


def dpo_healthy(steps: int = 100, *, seed: int = 0) -> list[Entry]:
    rng = random.Random(seed)
    history = []
    for step in range(1, steps + 1):
        progress = 1 - math.exp(-step / 30)
        history.append({
            "loss": 0.693 - 0.35 * progress + _noise(rng, 0.03), "grad_norm": 8 + _noise(rng, 2),
            "learning_rate": schedule(step, steps, 5e-7), "rewards/chosen": 0.2 * progress + _noise(rng, 0.05),
            "rewards/rejected": -0.6 * progress + _noise(rng, 0.05), "rewards/accuracies": 0.5 + 0.35 * progress
            + _noise(rng, 0.05), "rewards/margins": 0.8 * progress + _noise(rng, 0.05),
            "logps/chosen": -120 + 2 * progress + _noise(rng, 1),
            "logps/rejected": -130 - 6 * progress + _noise(rng, 1),
            "epoch": step / steps, "step": step,
        })
    return history


def reward_healthy(steps: int = 100, *, seed: int = 0) -> list[Entry]:
    rng = random.Random(seed)
    history = []
    for step in range(1, steps + 1):
        progress = 1 - math.exp(-step / 30)
        history.append({
            "loss": 0.69 - 0.3 * progress + _noise(rng, 0.03), "grad_norm": 3 + _noise(rng, 1),
            "learning_rate": schedule(step, steps, 1e-5), "accuracy": 0.55 + 0.25 * progress + _noise(rng, 0.04),
            "margin": 1.5 * progress + _noise(rng, 0.1), "mean_reward": _noise(rng, 0.5),
            "min_reward": -4 + _noise(rng, 1), "max_reward": 4 + _noise(rng, 1), "epoch": step / steps, "step": step,
        })
    return history


def grpo_healthy(steps: int = 100, *, seed: int = 0) -> list[Entry]:
    rng = random.Random(seed)
    history = []
    for step in range(1, steps + 1):
        progress = 1 - math.exp(-step / 40)
        reward = 0.2 + 0.5 * progress + _noise(rng, 0.05)
        history.append({
            "loss": _noise(rng, 0.02), "grad_norm": 0.3 + _noise(rng, 0.1), "learning_rate": 1e-6,
            "reward": reward, "reward_std": 0.35 + _noise(rng, 0.05), "frac_reward_zero_std": 0.3 + _noise(rng, 0.1),
            "rewards/accuracy_reward/mean": reward, "rewards/accuracy_reward/std": 0.4 + _noise(rng, 0.05),
            "rewards/format_reward/mean": 0.9 + _noise(rng, 0.05), "rewards/format_reward/std": 0.2 + _noise(rng, 0.05),
            "completions/mean_length": 180 + _noise(rng, 15), "completions/min_length": 40 + _noise(rng, 5),
            "completions/max_length": 400 + _noise(rng, 40), "completions/clipped_ratio": 0.03 + _noise(rng, 0.02),
            "completions/mean_terminated_length": 170 + _noise(rng, 10),
            "kl": 0.001 + 0.05 * progress + _noise(rng, 0.0005), "entropy": 0.7 - 0.2 * progress + _noise(rng, 0.03),
            "clip_ratio/low_mean": 0.001, "clip_ratio/high_mean": 0.002, "clip_ratio/region_mean": 0.003
            + _noise(rng, 0.002), "sampling/sampling_logp_difference/mean": 0.01 + _noise(rng, 0.003),
            "timing/generation": 6 + _noise(rng, 0.5), "timing/reward": 0.1, "timing/training": 3 + _noise(rng, 0.3),
            "timing/step": 9.2 + _noise(rng, 0.5), "timing/data": 0.01, "epoch": step / steps, "step": step,
        })
    return history


HEALTHY = {"sft": sft_healthy, "sft_cuda": lambda: sft_healthy(cuda=True), "dpo": dpo_healthy,
           "reward": reward_healthy, "grpo": grpo_healthy}


def with_values(history: list[Entry], key: str, values: list[float], *, start: int = 0) -> list[Entry]:
    """A copy of ``history`` whose train entries from index ``start`` take ``values`` for ``key``."""
    out = [dict(e) for e in history]
    train = [e for e in out if not any(k.startswith("eval_") or k == "train_runtime" for k in e)]
    for entry, value in zip(train[start:], values):
        entry[key] = value
    return out


def train_entries(history: list[Entry]) -> list[Entry]:
    return [e for e in history if not any(k.startswith("eval_") or k == "train_runtime" for k in e)]


def with_evals(history: list[Entry], evals: dict[int, float]) -> list[Entry]:
    """``history`` with an ``eval_loss`` log right after the train log of each step in ``evals``."""
    out: list[Entry] = []
    for entry in history:
        out.append(entry)
        if entry.get("step") in evals and "loss" in entry:
            out.append({"eval_loss": evals[entry["step"]], "eval_runtime": 1.0, "step": entry["step"]})
    return out
