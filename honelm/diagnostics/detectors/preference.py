"""Detectors for preference optimization (DPO, KTO) and reward modeling.

Metrics read: DPO/KTO ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, ``loss``; reward models ``accuracy``, ``margin``, ``mean_reward``,
``min_reward``, ``max_reward``; and their ``eval_`` versions.
"""

from __future__ import annotations

import math
from typing import Any

from ..events import Finding
from ..history import LogHistory, RunContext, Series
from ._common import Thresholds, detector, lr_suggestion, mean, scale, suggest, suggestions


def _accuracy(history: LogHistory, prefix: str = "") -> tuple[str, Series, Series]:
    """(name, accuracy series, margin series) of a preference or reward-model run."""
    get = history.eval if prefix else history.train
    if get(f"{prefix}rewards/accuracies"):
        return f"{prefix}rewards/accuracies", get(f"{prefix}rewards/accuracies"), get(f"{prefix}rewards/margins")
    if get(f"{prefix}accuracy") and get(f"{prefix}margin"):  # reward model (not SFT's token accuracy)
        return f"{prefix}accuracy", get(f"{prefix}accuracy"), get(f"{prefix}margin")
    return "", Series(), Series()


@detector("PREF_LIKELIHOOD_DISPLACEMENT")
def likelihood_displacement(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["PREF_LIKELIHOOD_DISPLACEMENT"]
    window = int(t["window"])
    chosen, rejected = ctx.history.train("logps/chosen"), ctx.history.train("logps/rejected")
    if min(len(chosen), len(rejected)) < max(int(t["min_logs"]), window + 1):
        return []
    c0, c1 = mean(chosen.values[:window]), mean(chosen.tail(window))
    r0, r1 = mean(rejected.values[:window]), mean(rejected.tail(window))
    drop = c0 - c1
    # Both fall, and the chosen side carries a real share of it (rejected answers falling faster
    # than chosen ones is how DPO normally widens the margin).
    falling = drop > max(t["min_abs_drop"], t["min_drop"] * abs(c0)) and r1 < r0
    if not (falling and drop >= t["min_share"] * (r0 - r1)):
        return []
    return [Finding(
        "PREF_LIKELIHOOD_DISPLACEMENT",
        f"The log-probability of the chosen answers fell from {c0:.4g} to {c1:.4g} while the rejected ones fell "
        f"from {r0:.4g} to {r1:.4g}: the margin grows by pushing both down (likelihood displacement), and "
        "probability moves to answers that are in neither. Add an NLL term on the chosen answers or keep the "
        "policy closer to the reference.",
        evidence={"metrics": ["logps/chosen", "logps/rejected"], "chosen_start": c0, "chosen_now": c1,
                  "rejected_start": r0, "rejected_now": r1, "min_drop": t["min_drop"],
                  "min_share": t["min_share"]},
        suggestions=suggestions(
            suggest(ctx.config, "rpo_alpha", lambda cur: 1.0 if not cur else None,
                    "adds the NLL of the chosen answers to the loss"),
            suggest(ctx.config, "beta", scale(2.0), "stay closer to the reference model"),
        ),
    )]


def _early(ctx: RunContext, step: int, epoch: Series, fraction: float) -> bool:
    max_steps = ctx.config.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return step <= fraction * max_steps
    epochs = ctx.config.get("num_train_epochs")
    if epoch and isinstance(epochs, (int, float)) and epochs > 0:
        return epoch.last <= fraction * epochs
    return False


@detector("PREF_ACCURACY_SATURATED")
def accuracy_saturated(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["PREF_ACCURACY_SATURATED"]
    window = int(t["window"])
    name, acc, _ = _accuracy(ctx.history)
    loss = ctx.history.train("loss")
    if len(acc) < window or len(loss) < window:
        return []
    saturated = all(a >= t["min_accuracy"] for a in acc.tail(window))
    if not (saturated and all(v <= t["max_loss"] for v in loss.tail(window))):
        return []
    if not _early(ctx, acc.last_step, ctx.history.train("epoch"), t["early_fraction"]):
        return []
    return [Finding(
        "PREF_ACCURACY_SATURATED",
        f"Preference accuracy is {mean(acc.tail(window)):.0%} with a loss of {loss.last:.2g} already at step "
        f"{acc.last_step}, early in training: the pairs are trivially separable (check that chosen and rejected "
        "differ in more than a give-away such as length or format) or the model is overfitting them.",
        evidence={"metric": name, "recent": acc.tail(window), "loss": loss.tail(window),
                  "min_accuracy": t["min_accuracy"], "max_loss": t["max_loss"]},
        suggestions=suggestions(
            suggest(ctx.config, "label_smoothing", lambda cur: 0.1 if not cur else None,
                    "robust DPO: assume some labels are noisy"),
            lr_suggestion(ctx.config, 0.5, "slower fitting"),
        ),
    )]


def _no_signal(ctx: RunContext, th: Thresholds, prefix: str) -> list[Finding]:
    t = th["PREF_NO_SIGNAL"]
    name, acc, _ = _accuracy(ctx.history, prefix)
    window = int(t["window"])
    if len(acc) < max(int(t["min_logs"]), window):
        return []
    level = mean(acc.tail(window))
    if not abs(level - 0.5) <= t["band"]:
        return []
    return [Finding(
        "PREF_NO_SIGNAL",
        f"Preference accuracy ({name}) has stayed at chance ({level:.2f}) over the last {window} logs: the model "
        "does not separate chosen from rejected answers. Check that the pairs differ, and raise the learning rate.",
        evidence={"metric": name, "recent": acc.tail(window), "mean": level, "band": t["band"]},
        suggestions=suggestions(lr_suggestion(ctx.config, 5.0, "the model is not moving")) if not prefix else (),
        subject="eval" if prefix else None,
    )]


@detector("PREF_NO_SIGNAL")
def no_signal(ctx: RunContext, th: Thresholds) -> list[Finding]:
    return _no_signal(ctx, th, "")


@detector("PREF_NO_SIGNAL", on="eval")
def no_signal_eval(ctx: RunContext, th: Thresholds) -> list[Finding]:
    return _no_signal(ctx, th, "eval_")


def _below_chance(ctx: RunContext, th: Thresholds, prefix: str) -> list[Finding]:
    t = th["PREF_ACCURACY_BELOW_CHANCE"]
    name, acc, margin = _accuracy(ctx.history, prefix)
    window = int(t["window"])
    if len(acc) < max(int(t["min_logs"]), window):
        return []
    level = mean(acc.tail(window))
    margins = mean(margin.tail(window)) if margin else math.nan
    if not level < t["max_accuracy"] or (math.isfinite(margins) and margins > 0):
        return []
    return [Finding(
        "PREF_ACCURACY_BELOW_CHANCE",
        f"Preference accuracy ({name}) is {level:.2f}, below chance, over the last {window} logs"
        + (f" (mean margin {margins:.3g})" if math.isfinite(margins) else "")
        + ": the model prefers the rejected answers. The chosen and rejected columns are likely swapped.",
        evidence={"metric": name, "recent": acc.tail(window), "mean": level, "threshold": t["max_accuracy"],
                  "mean_margin": margins},
        subject="eval" if prefix else None,
    )]


@detector("PREF_ACCURACY_BELOW_CHANCE")
def below_chance(ctx: RunContext, th: Thresholds) -> list[Finding]:
    return _below_chance(ctx, th, "")


@detector("PREF_ACCURACY_BELOW_CHANCE", on="eval")
def below_chance_eval(ctx: RunContext, th: Thresholds) -> list[Finding]:
    return _below_chance(ctx, th, "eval_")


@detector("REWARD_SCALE_DRIFT")
def reward_scale_drift(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["REWARD_SCALE_DRIFT"]
    window = int(t["window"])
    mean_reward = ctx.history.train("mean_reward")
    if len(mean_reward) < window:
        return []
    level = mean(mean_reward.tail(window))
    lo, hi = ctx.history.train("min_reward"), ctx.history.train("max_reward")
    spread = mean([b - a for a, b in zip(lo.tail(window), hi.tail(window))]) if lo and hi else math.nan
    drift = abs(level) > t["max_abs_mean"]
    wide = math.isfinite(spread) and spread > t["max_spread"]
    if not (drift or wide):
        return []
    what = f"the mean reward is {level:.3g}" if drift else f"rewards spread over {spread:.3g}"
    return [Finding(
        "REWARD_SCALE_DRIFT",
        f"The reward model's scale is drifting: {what}. Only differences of rewards are trained, so their level "
        "and scale wander freely; this hurts reward-model ensembles and RL that uses the raw scores"
        + ("." if drift else " (large `margin` values or long training push the scores apart). Normalize the "
           "rewards before using them."),
        evidence={"metric": "mean_reward", "recent": mean_reward.tail(window), "mean": level, "spread": spread,
                  "max_abs_mean": t["max_abs_mean"], "max_spread": t["max_spread"]},
        # Centering penalizes (r_chosen + r_rejected)^2: it moves the level, not the spread.
        suggestions=suggestions(suggest(
            ctx.config, "center_rewards_coefficient", lambda cur: 0.01 if not cur else None,
            "pulls the rewards toward zero",
        )) if drift else (),
    )]


DETECTORS: tuple[Any, ...] = (
    likelihood_displacement,
    accuracy_saturated,
    no_signal,
    no_signal_eval,
    below_chance,
    below_chance_eval,
    reward_scale_drift,
)
