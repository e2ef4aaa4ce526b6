"""Detectors for any trainer: non-finite values, gradient spikes, divergence, a flat loss,
overfitting, mixture-of-experts router imbalance.

Metrics read: ``loss``, ``grad_norm``, ``learning_rate``, ``eval_loss``, ``aux_loss``,
``epoch``.
"""

from __future__ import annotations

import math

from ..events import Finding
from ..history import RunContext
from ._common import (
    Thresholds,
    clipping_suggestion,
    detector,
    finite,
    is_online_rl,
    lr_suggestion,
    mean,
    median,
    nice,
    suggest,
    suggestions,
)


@detector("LOSS_NOT_FINITE")
def loss_not_finite(ctx: RunContext, th: Thresholds) -> list[Finding]:
    loss = ctx.history.train("loss")
    if not loss or math.isfinite(loss.last):
        return []
    return [Finding(
        "LOSS_NOT_FINITE",
        f"The loss is {loss.last} at step {loss.last_step}: training has broken down. Lower the learning "
        "rate, keep gradient clipping on, and restart from the last checkpoint with a finite loss.",
        evidence={"metric": "loss", "value": loss.last, "recent": loss.tail(5)},
        suggestions=suggestions(
            lr_suggestion(ctx.config, 0.1, "smaller updates"), clipping_suggestion(ctx.config)
        ),
    )]


@detector("GRAD_NORM_NOT_FINITE")
def grad_norm_not_finite(ctx: RunContext, th: Thresholds) -> list[Finding]:
    grad = ctx.history.train("grad_norm")
    if not grad or math.isfinite(grad.last):
        return []
    # fp16 loss scaling skips steps whose gradients overflowed; that is expected now and then.
    needed = int(th["GRAD_NORM_NOT_FINITE"]["fp16_consecutive"]) if ctx.config.get("fp16") else 1
    recent = grad.tail(needed)
    if len(recent) < needed or any(math.isfinite(v) for v in recent):
        return []
    extra = " (fp16 loss scaling could not recover)" if needed > 1 else ""
    return [Finding(
        "GRAD_NORM_NOT_FINITE",
        f"The gradient norm is {grad.last} at step {grad.last_step}{extra}: the weights are being corrupted. "
        "Lower the learning rate and keep gradient clipping on; with fp16, prefer bf16.",
        evidence={"metric": "grad_norm", "value": grad.last, "recent": grad.tail(5)},
        suggestions=suggestions(
            lr_suggestion(ctx.config, 0.1, "smaller updates"),
            clipping_suggestion(ctx.config),
            suggest(ctx.config, "bf16", lambda cur: True if ctx.config.get("fp16") else None,
                    "bf16 has the range of fp32; use it when the accelerator supports it"),
        ),
    )]


@detector("GRAD_NORM_SPIKE")
def grad_norm_spike(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["GRAD_NORM_SPIKE"]
    grad = ctx.history.train("grad_norm")
    if len(grad) < int(t["min_history"]) + 1 or not math.isfinite(grad.last):
        return []
    before = finite(grad.values[-int(t["window"]) - 1 : -1])
    if len(before) < int(t["min_history"]):
        return []
    reference = median(before)
    # A spike is sudden: also far above the previous value (a norm growing steadily is not a spike).
    if not reference > 0 or grad.last <= t["factor"] * max(reference, before[-1]):
        return []
    return [Finding(
        "GRAD_NORM_SPIKE",
        f"The gradient norm jumped to {grad.last:.3g} at step {grad.last_step}, {grad.last / reference:.0f}x its "
        f"recent median ({reference:.3g}). Isolated spikes are often harmless with clipping; repeated ones mean "
        "the updates are too large.",
        evidence={"metric": "grad_norm", "value": grad.last, "median": reference,
                  "ratio": grad.last / reference, "threshold": t["factor"], "recent": grad.tail(6)},
        suggestions=suggestions(
            clipping_suggestion(ctx.config), lr_suggestion(ctx.config, 0.5, "smaller updates")
        ),
    )]


@detector("LOSS_DIVERGING")
def loss_diverging(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["LOSS_DIVERGING"]
    window = int(t["window"])
    loss = ctx.history.train("loss")
    if len(loss) < window + 1 or is_online_rl(ctx.history):
        return []
    lowest = loss.min_before(window)
    recent = loss.tail(window)
    if not (math.isfinite(lowest) and lowest > 0):
        return []
    limit = max(t["ratio"] * lowest, lowest + t["min_increase"])
    # The median of the window: one spike is not divergence, one dip does not end it.
    if not median(recent) > limit:
        return []
    return [Finding(
        "LOSS_DIVERGING",
        f"The loss is diverging: the last {window} logged values ({', '.join(f'{v:.3g}' for v in recent)}) are mostly "
        f"more than {t['ratio']:g}x its lowest value so far ({lowest:.3g}). The learning rate is too high.",
        evidence={"metric": "loss", "recent": recent, "lowest_before": lowest, "limit": limit,
                  "ratio": t["ratio"], "learning_rate": ctx.history.train("learning_rate").tail(1)},
        suggestions=suggestions(
            lr_suggestion(ctx.config, 0.1, "the loss diverges at the current rate"),
            clipping_suggestion(ctx.config),
            suggest(ctx.config, "warmup_steps", lambda cur: 0.05 if not cur else None,
                    "warm up over the first 5% of steps"),
        ),
    )]


def _in_warmup(ctx: RunContext) -> bool:
    lr = ctx.history.train("learning_rate")
    peak = ctx.config.get("learning_rate")
    if not lr or not isinstance(peak, (int, float)) or peak <= 0:
        return False
    return lr.last < 0.5 * peak and bool(ctx.config.get("warmup_steps"))


def _shorter_warmup(current: float) -> float | None:
    """A quarter of the warmup: steps (an int) stay steps, a ratio (< 1) stays a ratio."""
    if not current or current <= 0:
        return None
    return max(int(current // 4), 1) if current >= 1 else nice(current / 4)


@detector("LOSS_FLAT")
def loss_flat(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["LOSS_FLAT"]
    loss = ctx.history.train("loss")
    if len(loss) < int(t["min_logs"]) or is_online_rl(ctx.history):
        return []
    if loss.last_step - loss.steps[0] < t["min_steps"]:
        return []
    start = mean(loss.values[:3])
    lowest = min(finite(loss.values), default=math.nan)
    if not (start > 0 and math.isfinite(lowest)) or lowest < (1 - t["min_drop"]) * start:
        return []
    grad = median(ctx.history.train("grad_norm").tail(10))
    if _in_warmup(ctx):
        steps = ctx.config.get("warmup_steps")
        advice = "The learning rate is still warming up: shorten the warmup."
        fix = suggest(ctx.config, "warmup_steps", _shorter_warmup, f"warmup_steps={steps} keeps the rate low too long")
    else:
        advice = "The learning rate is likely too low."
        fix = lr_suggestion(ctx.config, 10.0, "the loss has not moved at the current rate")
    return [Finding(
        "LOSS_FLAT",
        f"The loss has not decreased in {loss.last_step - loss.steps[0]} steps (from {start:.4g} at the start; "
        f"lowest {lowest:.4g}). {advice}",
        evidence={"metric": "loss", "start": start, "lowest": lowest, "recent": loss.tail(5),
                  "min_drop": t["min_drop"], "grad_norm_median": grad,
                  "learning_rate": ctx.history.train("learning_rate").tail(1)},
        suggestions=suggestions(fix),
    )]


@detector("EVAL_LOSS_RISING", on="eval")
def eval_loss_rising(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["EVAL_LOSS_RISING"]
    evals = int(t["evals"])
    ev = ctx.history.eval("eval_loss")
    if len(ev) < evals + 1:
        return []
    best = ev.min_before(evals)
    recent = ev.values[-evals - 1 :]
    rising = all(b > a for a, b in zip(recent, recent[1:]))
    if not (math.isfinite(best) and rising and ev.last > best * (1 + t["min_rise"])):
        return []
    best_index = max(i for i in range(len(ev) - evals) if ev.values[i] == best)
    best_step = ev.steps[best_index]
    train = ctx.history.train("loss")
    then = [v for s, v in zip(train.steps, train.values) if s <= best_step][-3:]
    now = train.tail(3)
    if not then or not now or not mean(now) < mean(then):
        return []  # the train loss is not falling: not overfitting (see LOSS_DIVERGING / LOSS_FLAT)
    epoch = [v for s, v in zip(ctx.history.train("epoch").steps, ctx.history.train("epoch").values) if s <= best_step]
    by_steps = isinstance(ctx.config.get("max_steps"), int) and ctx.config.get("max_steps", -1) > 0
    shorter = (suggest(ctx.config, "max_steps", best_step, f"the eval loss was lowest at step {best_step}")
               if by_steps else
               suggest(ctx.config, "num_train_epochs", max(round(epoch[-1], 1), 0.1) if epoch else None,
                       f"the eval loss was lowest at step {best_step}"))
    return [Finding(
        "EVAL_LOSS_RISING",
        f"The eval loss rose in the last {evals} evaluations (to {ev.last:.4g}, from its best {best:.4g} at step "
        f"{best_step}) while the train loss kept falling: the model is overfitting. Stop earlier or keep the best "
        "checkpoint.",
        evidence={"metric": "eval_loss", "recent": recent, "best": best, "best_step": best_step,
                  "train_loss_then": mean(then), "train_loss_now": mean(now), "min_rise": t["min_rise"]},
        suggestions=suggestions(
            suggest(ctx.config, "load_best_model_at_end", True,
                    "keep the checkpoint with the lowest eval loss (save_strategy must match eval_strategy)"),
            shorter,
        ),
    )]


@detector("MOE_ROUTER_IMBALANCE")
def moe_router_imbalance(ctx: RunContext, th: Thresholds) -> list[Finding]:
    t = th["MOE_ROUTER_IMBALANCE"]
    window = int(t["window"])
    aux = ctx.history.train("aux_loss")
    top_k = ctx.model.get("num_experts_per_tok")
    if len(aux) < window or not isinstance(top_k, (int, float)) or top_k <= 0:
        return []
    # The load-balancing loss of transformers' MoE models equals top_k when routing is uniform.
    level = mean(aux.tail(window)) / top_k
    if not level > t["ratio"]:
        return []
    coef = ctx.model.get("router_aux_loss_coef")
    return [Finding(
        "MOE_ROUTER_IMBALANCE",
        f"The router load-balancing loss is {level:.2f}x its balanced value ({top_k:g}): a few experts receive "
        "most tokens, the others barely train. Weight the load-balancing loss more.",
        evidence={"metric": "aux_loss", "recent": aux.tail(window), "balanced_value": top_k, "ratio": level,
                  "threshold": t["ratio"], "router_aux_loss_coef": coef},
        suggestions=suggestions(suggest(
            ctx.config, "router_aux_loss_coef",
            lambda cur: nice(2 * (cur if isinstance(cur, (int, float)) and cur > 0 else (coef or 0.001))),
            "a stronger pull toward balanced routing",
        )),
    )]


DETECTORS = (
    loss_not_finite,
    grad_norm_not_finite,
    grad_norm_spike,
    loss_diverging,
    loss_flat,
    eval_loss_rising,
    moe_router_imbalance,
)
