"""Helpers shared by the detectors: marking, statistics, suggestions that name real fields."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..events import Suggestion

Thresholds = Mapping[str, Mapping[str, float]]


def detector(*codes: str, on: str = "train") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a detector with the codes it can raise and the logs that trigger it.

    ``on`` is ``"train"`` (checked at every training log) or ``"eval"`` (at every evaluation
    log). A detector is a pure function ``(RunContext, thresholds) -> list[Finding]``, where
    ``thresholds`` maps every code to its resolved thresholds.
    """

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.codes = tuple(codes)  # type: ignore[attr-defined]
        fn.on = on  # type: ignore[attr-defined]
        return fn

    return mark


def finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def mean(values: Sequence[float]) -> float:
    values = finite(values)
    return sum(values) / len(values) if values else math.nan


def median(values: Sequence[float]) -> float:
    values = finite(values)
    return statistics.median(values) if values else math.nan


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation of two equally long series (NaN when one is constant)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def nice(value: float) -> float:
    """``value`` rounded to 2 significant digits (for proposed learning rates and weights)."""
    if value == 0 or not math.isfinite(value):
        return value
    digits = 1 - int(math.floor(math.log10(abs(value))))
    return round(value, digits)


def pct(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def suggest(
    config: Mapping[str, Any], param: str, propose: Any, reason: str = ""
) -> Suggestion | None:
    """A suggestion to change ``param``, or None when it does not apply.

    ``propose`` is the proposed value or a function ``current -> proposed`` (returning None
    when nothing should change). When the config is known (non-empty) and has no field
    ``param``, there is no suggestion: suggestions only ever name real fields. When the
    config is unknown (a run made elsewhere), ``current`` is None and only fixed proposals
    are made.
    """
    known = bool(config)
    if known and param not in config:
        return None
    current = config.get(param) if known else None
    if callable(propose):
        if not known:
            return None
        proposed = propose(current)
    else:
        proposed = propose
    if proposed is None or (known and proposed == current):
        return None
    return Suggestion(param=param, current=current, proposed=proposed, reason=reason)


def suggestions(*items: Suggestion | None) -> tuple[Suggestion, ...]:
    return tuple(s for s in items if s is not None)


def scale(factor: float, *, minimum: float | None = None) -> Callable[[Any], Any]:
    """``current -> current * factor`` (rounded), for numeric fields; None when not a number."""

    def propose(current: Any) -> Any:
        if isinstance(current, bool) or not isinstance(current, (int, float)) or current <= 0:
            return None
        # Integer fields (lengths, counts) stay integers; rates are rounded to 2 significant digits.
        value = max(1, round(current * factor)) if isinstance(current, int) else nice(current * factor)
        return max(value, minimum) if minimum is not None else value

    return propose


def is_online_rl(history: Any) -> bool:
    """Whether the run logs online-RL metrics (GRPO, RLOO)."""
    return any(history.train(k) for k in ("reward", "reward_std", "frac_reward_zero_std"))


def lr_suggestion(config: Mapping[str, Any], factor: float, reason: str) -> Suggestion | None:
    return suggest(config, "learning_rate", scale(factor), reason)


def clipping_suggestion(config: Mapping[str, Any]) -> Suggestion | None:
    """Turn gradient clipping on when it is off."""
    return suggest(
        config, "max_grad_norm", lambda cur: 1.0 if not cur or cur <= 0 else None, "clip gradients to norm 1"
    )
