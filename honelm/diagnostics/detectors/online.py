"""Detectors for online RL (GRPO, RLOO).

Metrics read (TRL's names): ``reward``, ``reward_std``, ``frac_reward_zero_std``,
``rewards/<function>/mean`` and ``/std``, ``completions/mean_length``,
``completions/clipped_ratio``, ``entropy``, ``kl``, ``clip_ratio/region_mean`` (or
``clip_ratio``), ``sampling/sampling_logp_difference/mean``.
"""

from __future__ import annotations

from typing import Any

from ..events import Finding
from ..history import RunContext
from ._common import (
    Thresholds,
    correlation,
    detector,
    is_online_rl,
    lr_suggestion,
    mean,
    nice,
    pct,
    scale,
    suggest,
    suggestions,
)


def _more_generations(current: Any) -> Any:
    return 2 * current if isinstance(current, int) and current >= 2 else None


def _warmer(current: Any) -> Any:
    return nice(min(current + 0.3, 1.5)) if isinstance(current, (int, float)) and current < 1.2 else None


@detector("GRPO_ZERO_REWARD_STD")
def zero_reward_std(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_ZERO_REWARD_STD"]
    window = int(t["window"])
    frac, std = ctx.history.train("frac_reward_zero_std"), ctx.history.train("reward_std")
    if len(frac) >= window:
        level = mean(frac.tail(window))
        evidence: dict[str, Any] = {"metric": "frac_reward_zero_std", "recent": frac.tail(window)}
    elif len(std) >= window and all(v <= 1e-8 for v in std.tail(window)):
        level = 1.0
        evidence = {"metric": "reward_std", "recent": std.tail(window)}
    else:
        return []
    if level >= t["error_fraction"]:
        severity = "error"
    elif level >= t["warn_fraction"]:
        severity = "warning"
    else:
        return []
    evidence.update(mean=level, warn_fraction=t["warn_fraction"], error_fraction=t["error_fraction"],
                    reward=ctx.history.train("reward").tail(window))
    return [Finding(
        "GRPO_ZERO_REWARD_STD",
        f"Reward variance within prompt groups is zero in {pct(level)} of groups: all completions of a prompt get "
        "the same reward, so their advantages are zero and the training signal has vanished. Revise the reward "
        "function (partial credit separates completions) or sample more, more diverse completions.",
        evidence=evidence,
        suggestions=suggestions(
            suggest(ctx.config, "num_generations", _more_generations, "more completions per prompt"),
            suggest(ctx.config, "temperature", _warmer, "more diverse completions"),
        ),
        severity=severity,
    )]


@detector("GRPO_REWARD_FN_CONSTANT")
def reward_fn_constant(ctx: RunContext, th: Thresholds) -> list[Finding]:
    needed = int(th["GRPO_REWARD_FN_CONSTANT"]["min_logs"])
    findings = []
    for key in ctx.history.train_keys():
        if not (key.startswith("rewards/") and key.endswith("/std")):
            continue
        name = key[len("rewards/") : -len("/std")]
        std, avg = ctx.history.train(key), ctx.history.train(f"rewards/{name}/mean")
        if len(std) < needed or len(avg) < needed or any(abs(v) > 1e-12 for v in std.values):
            continue
        if max(avg.values) - min(avg.values) > 1e-12:
            continue
        findings.append(Finding(
            "GRPO_REWARD_FN_CONSTANT",
            f"The reward function {name!r} has returned {avg.last:.4g} for every completion in all {len(std)} logs: "
            "it adds nothing to the advantages. Check that it parses the completions (a format mismatch often "
            "makes every score 0) and that its inputs reach it.",
            evidence={"metrics": [f"rewards/{name}/mean", key], "value": avg.last, "std": 0.0, "logs": len(std)},
            subject=name,
        ))
    return findings


@detector("GRPO_COMPLETIONS_TRUNCATED")
def completions_truncated(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_COMPLETIONS_TRUNCATED"]
    window = int(t["window"])
    clipped = ctx.history.train("completions/clipped_ratio")
    if len(clipped) < window:
        return []
    level = mean(clipped.tail(window))
    if not level > t["max_fraction"]:
        return []
    return [Finding(
        "GRPO_COMPLETIONS_TRUNCATED",
        f"{pct(level)} of completions are cut at max_completion_length: truncated answers get rewards for text "
        "they did not finish. Allow longer completions or leave truncated ones out of the loss.",
        evidence={"metric": "completions/clipped_ratio", "recent": clipped.tail(window), "mean": level,
                  "threshold": t["max_fraction"],
                  "mean_length": ctx.history.train("completions/mean_length").tail(1)},
        suggestions=suggestions(
            suggest(ctx.config, "max_completion_length", scale(2.0), "room to finish"),
            suggest(ctx.config, "mask_truncated_completions", lambda cur: True if cur is False else None,
                    "truncated completions do not count in the loss"),
        ),
    )]


@detector("GRPO_LENGTH_HACKING")
def length_hacking(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_LENGTH_HACKING"]
    length, reward = ctx.history.train("completions/mean_length"), ctx.history.train("reward")
    n = min(len(length), len(reward))
    if n < int(t["min_logs"]):
        return []
    lengths, rewards = length.values[-n:], reward.values[-n:]
    start, now = mean(lengths[:3]), mean(lengths[-3:])
    growth = now / start - 1 if start > 0 else 0.0
    corr = correlation(lengths, rewards)
    if not (growth >= t["min_growth"] and corr >= t["min_correlation"]):
        return []
    return [Finding(
        "GRPO_LENGTH_HACKING",
        f"Completions grew {pct(growth)} longer (mean length {start:.0f} -> {now:.0f}) and length tracks the reward "
        f"(correlation {corr:.2f}): the policy may be earning reward by writing more rather than better. Check "
        "whether the reward favors length; add a length penalty or cap.",
        evidence={"metrics": ["completions/mean_length", "reward"], "length_start": start, "length_now": now,
                  "growth": growth, "correlation": corr, "min_growth": t["min_growth"],
                  "min_correlation": t["min_correlation"]},
        suggestions=suggestions(suggest(
            ctx.config, "loss_type", lambda cur: "dr_grpo" if cur in ("grpo", "bnpo", "dapo") else None,
            "no per-sequence length normalization, which favors long wrong answers",
        )),
    )]


def _entropy_levels(ctx: RunContext, window: int, min_logs: int) -> tuple[float, float] | None:
    entropy = ctx.history.train("entropy")
    if len(entropy) < max(min_logs, 2 * window) or not is_online_rl(ctx.history):
        return None
    return mean(entropy.values[:window]), mean(entropy.tail(window))


@detector("GRPO_ENTROPY_COLLAPSE")
def entropy_collapse(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_ENTROPY_COLLAPSE"]
    levels = _entropy_levels(ctx, int(t["window"]), int(t["min_logs"]))
    if levels is None:
        return []
    start, now = levels
    if not (now < t["min_ratio"] * start or now < t["min_entropy"]):
        return []
    return [Finding(
        "GRPO_ENTROPY_COLLAPSE",
        f"The policy's entropy collapsed from {start:.3g} to {now:.3g}: it samples nearly the same tokens every time, "
        "so groups stop varying and exploration ends. Sample at a higher temperature, or slow the updates.",
        evidence={"metric": "entropy", "start": start, "now": now, "recent": ctx.history.train("entropy").tail(5),
                  "min_ratio": t["min_ratio"], "min_entropy": t["min_entropy"]},
        suggestions=suggestions(
            suggest(ctx.config, "temperature", _warmer, "more exploration"),
            lr_suggestion(ctx.config, 0.5, "slower sharpening of the policy"),
        ),
    )]


@detector("GRPO_ENTROPY_BLOWUP")
def entropy_blowup(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_ENTROPY_BLOWUP"]
    levels = _entropy_levels(ctx, int(t["window"]), int(t["min_logs"]))
    if levels is None:
        return []
    start, now = levels
    if not (now > t["max_ratio"] * start and now > t["min_entropy"]):
        return []
    return [Finding(
        "GRPO_ENTROPY_BLOWUP",
        f"The policy's entropy rose from {start:.3g} to {now:.3g}: its outputs are turning into noise. The updates "
        "are too large; lower the learning rate or strengthen the KL penalty.",
        evidence={"metric": "entropy", "start": start, "now": now, "recent": ctx.history.train("entropy").tail(5),
                  "max_ratio": t["max_ratio"]},
        suggestions=suggestions(
            lr_suggestion(ctx.config, 0.5, "smaller updates"),
            suggest(ctx.config, "beta", scale(2.0), "stay closer to the reference model"),
        ),
    )]


@detector("GRPO_KL_EXPLOSION")
def kl_explosion(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_KL_EXPLOSION"]
    window = int(t["window"])
    kl = ctx.history.train("kl")
    if len(kl) < window or not is_online_rl(ctx.history):
        return []
    if not all(v > t["max_kl"] for v in kl.tail(window)):
        return []
    return [Finding(
        "GRPO_KL_EXPLOSION",
        f"The KL divergence to the reference model is {kl.last:.3g} (above {t['max_kl']:g} for {window} logs): the "
        "policy is running away from the reference, usually into degenerate outputs. Lower the learning rate or "
        "raise the KL coefficient.",
        evidence={"metric": "kl", "recent": kl.tail(window + 2), "threshold": t["max_kl"]},
        suggestions=suggestions(
            lr_suggestion(ctx.config, 0.5, "smaller updates"),
            suggest(ctx.config, "beta", scale(2.0), "a stronger pull toward the reference"),
        ),
    )]


@detector("GRPO_CLIP_RATIO_HIGH")
def clip_ratio_high(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_CLIP_RATIO_HIGH"]
    key = "clip_ratio/region_mean" if ctx.history.train("clip_ratio/region_mean") else "clip_ratio"
    clip = ctx.history.train(key)
    if len(clip) < int(t["min_logs"]):
        return []
    recent = clip.tail(int(t["window"]))
    share = sum(v > t["max_clip_ratio"] for v in recent) / len(recent)
    if not share >= t["max_fraction"]:
        return []
    return [Finding(
        "GRPO_CLIP_RATIO_HIGH",
        f"The clipping ratio exceeded its acceptable range ({t['max_clip_ratio']:g}) in {pct(share)} of the last "
        f"{len(recent)} logged steps: each update moves the policy too far from the one that generated the data. "
        "Lower the learning rate.",
        evidence={"metric": key, "recent": recent, "share_above": share, "max_clip_ratio": t["max_clip_ratio"],
                  "max_fraction": t["max_fraction"]},
        suggestions=suggestions(
            lr_suggestion(ctx.config, 0.5, "smaller updates"),
            suggest(ctx.config, "num_iterations", lambda cur: cur - 1 if isinstance(cur, int) and cur > 1 else None,
                    "fewer updates on each generated batch"),
        ),
    )]


@detector("GRPO_LOGPS_MISMATCH")
def logps_mismatch(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRPO_LOGPS_MISMATCH"]
    window = int(t["window"])
    diff = ctx.history.train("sampling/sampling_logp_difference/mean")
    if len(diff) < window:
        return []
    level = mean(diff.tail(window))
    if not level > t["max_difference"]:
        return []
    return [Finding(
        "GRPO_LOGPS_MISMATCH",
        f"The generator's and the trainer's log-probabilities of the same tokens differ by {level:.3g} on average: "
        "the completions are effectively off-policy (different precision, kernels or stale weights). Correct with "
        "importance sampling, and check that weights are synced to the generator every step.",
        evidence={"metric": "sampling/sampling_logp_difference/mean", "recent": diff.tail(window),
                  "threshold": t["max_difference"]},
        suggestions=suggestions(suggest(
            ctx.config, "vllm_importance_sampling_correction", lambda cur: True if cur is False else None,
            "reweights tokens by the trainer/generator probability ratio",
        )),
    )]


DETECTORS = (
    zero_reward_std,
    reward_fn_constant,
    completions_truncated,
    length_hacking,
    entropy_collapse,
    entropy_blowup,
    kl_explosion,
    clip_ratio_high,
    logps_mismatch,
)
