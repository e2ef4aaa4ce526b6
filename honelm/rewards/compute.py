"""Calling reward functions and combining their rewards.

    from honelm.rewards import accuracy_reward, compute_rewards, think_format_reward

    out = compute_rewards(
        [accuracy_reward, think_format_reward], prompts, completions, completion_ids,
        columns={"solution": solutions}, reward_weights=[1.0, 0.2], num_generations=8,
    )
    out.rewards_per_func   # (N, K) float32, NaN where a function returned None
    out.rewards            # (N,) combined, see `aggregate_rewards`
    out.metrics()          # {"rewards/accuracy_reward/mean": ..., "reward": ..., ...}

A reward function is called as ``f(prompts=..., completions=..., completion_ids=..., **columns)``
and returns one ``float`` (or ``None``: "does not apply to this sample") per completion. It may
be ``async``: async functions run concurrently with each other and with the sync ones. Every
extra dataset column arrives as a keyword argument of its name, so functions take ``**kwargs``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
SCALE_REWARDS = ("group", "batch", "none")
_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable; the message names the
    function and the sample."""


def reward_func_name(func: Any) -> str:
    """The name a reward function's metrics are logged under (``rewards/<name>/mean``)."""
    name = getattr(func, "__name__", None)
    if name:
        return str(name)
    if isinstance(func, functools.partial):
        return reward_func_name(func.func)
    return type(func).__name__


@dataclass
class RewardOutput:
    """Rewards of one batch.

    Attributes:
        names: One name per reward function (duplicates get ``_2``, ``_3``, ...).
        rewards_per_func: ``(N, K)`` float32; ``NaN`` where a function returned ``None``.
        weights: ``(K,)`` float32 reward weights.
        rewards: ``(N,)`` float32, :func:`aggregate_rewards` of the above with ``aggregation``.
        aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
    """

    names: list[str]
    rewards_per_func: torch.Tensor
    weights: torch.Tensor
    rewards: torch.Tensor
    aggregation: str

    def metrics(self) -> dict[str, float]:
        """Per-function ``rewards/<name>/mean`` and ``/std`` (``None`` samples excluded), and
        ``reward`` / ``reward_std`` of the weighted sum of the rewards (before any normalization)."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            out[f"rewards/{name}/mean"] = _nanmean(self.rewards_per_func[:, k])
            out[f"rewards/{name}/std"] = _nanstd(self.rewards_per_func[:, k])
        total = (self.rewards_per_func * self.weights).nansum(dim=1)
        out["reward"] = float(total.mean()) if total.numel() else math.nan
        out["reward_std"] = float(total.std()) if total.numel() > 1 else 0.0
        return out


def _nanmean(x: torch.Tensor) -> float:
    kept = x[~torch.isnan(x)]
    return float(kept.mean()) if kept.numel() else math.nan


def _nanstd(x: torch.Tensor) -> float:
    kept = x[~torch.isnan(x)]
    return float(kept.std()) if kept.numel() > 1 else (0.0 if kept.numel() else math.nan)


# ------------------------------------------------------------------------------ aggregation


def aggregate_rewards(
    rewards_per_func: torch.Tensor,
    reward_weights: Sequence[float] | torch.Tensor | None = None,
    *,
    aggregation: str = "sum_then_normalize",
    num_generations: int | None = None,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Combine the rewards of several functions into one value per sample, ``(N,)``.

    - ``"sum_then_normalize"`` (GRPO's default): the weighted sum of each sample's rewards,
      ``sum_k w_k r_k`` (functions that returned ``None`` are left out of the sum). The
      trainer then normalizes it within each group of ``num_generations`` into advantages.
    - ``"normalize_then_sum"`` (GDPO, Liu et al. 2026, arXiv:2601.05242): each function's
      rewards are first normalized within each group, ``(r_k - mean_g(r_k)) / (std(r_k) +
      eps)``, then weighted and summed, and the sum is standardized over the whole batch. The
      result is already normalized: use it as the advantages as it is. Unlike the plain sum it
      keeps apart reward combinations that add up to the same value but are not equally rare
      in their group. Needs ``num_generations``; the rows of one group are consecutive.
      ``scale_rewards`` (TRL's field) picks the ``std`` of the first step: the group's
      (``"group"``, GDPO), the whole batch's (``"batch"``), or none (``"none"``: centering only).

    Standard deviations are unbiased and ignore ``None`` rewards; one taken over fewer than
    two rewards counts as 0. In a multi-process run, gather ``rewards_per_func`` from all
    processes first so that groups and the batch are complete.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}.")
    rpf = rewards_per_func.float()
    if rpf.dim() != 2:
        raise ValueError(f"rewards_per_func must have shape (num_samples, num_funcs), got {tuple(rpf.shape)}.")
    n, k = rpf.shape
    weights = _weights(reward_weights, k, rpf.device)
    if aggregation == "sum_then_normalize":
        return (rpf * weights).nansum(dim=1)
    if not num_generations or num_generations < 1 or n % num_generations:
        raise ValueError(
            f"normalize_then_sum needs num_generations dividing the number of samples; got num_generations="
            f"{num_generations} for {n} samples."
        )
    grouped = rpf.view(-1, num_generations, k)  # (groups, G, K)
    mean, group_std = _nan_mean_std(grouped, dim=1)  # (groups, 1, K) each
    if scale_rewards == "group":
        scale = group_std + eps
    elif scale_rewards == "batch":
        scale = _nan_mean_std(rpf, dim=0)[1] + eps  # (1, K)
    else:
        scale = torch.ones_like(group_std)
    normalized = ((grouped - mean) / scale).view(n, k)  # NaN stays NaN
    summed = (normalized * weights).nansum(dim=1)  # (N,)
    batch_std = summed.std() if n > 1 else torch.zeros((), device=summed.device)
    return (summed - summed.mean()) / (batch_std + eps)


def _nan_mean_std(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std along ``dim`` ignoring NaN (std 0 below two values), keepdim."""
    present = ~torch.isnan(x)
    count = present.sum(dim=dim, keepdim=True)
    zeros = torch.zeros_like(x)
    mean = torch.where(present, x, zeros).sum(dim=dim, keepdim=True) / count.clamp(min=1)
    var = (torch.where(present, x - mean, zeros) ** 2).sum(dim=dim, keepdim=True)
    std = torch.where(count > 1, (var / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(var))
    return mean, std


def _weights(reward_weights: Sequence[float] | torch.Tensor | None, k: int, device: torch.device) -> torch.Tensor:
    if reward_weights is None:
        return torch.ones(k, device=device)
    weights = torch.as_tensor(reward_weights, dtype=torch.float32, device=device).flatten()
    if weights.numel() != k:
        raise ValueError(
            f"reward_weights has {weights.numel()} values for {k} reward functions; give one weight per function."
        )
    return weights


# ---------------------------------------------------------------------------------- calling


def compute_rewards(
    reward_funcs: Callable[..., Any] | Sequence[Callable[..., Any]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    reward_weights: Sequence[float] | None = None,
    aggregation: str = "sum_then_normalize",
    num_generations: int | None = None,
    scale_rewards: str = "group",
    trainer_state: Any = None,
) -> RewardOutput:
    """Call every reward function on the batch and combine the results.

    Args:
        reward_funcs: Reward functions (sync or async), :class:`~honelm.rewards.RewardModel`\\ s,
            or a single one. Model names and raw models go through
            :func:`~honelm.rewards.load_reward_funcs` first.
        prompts, completions: One entry per sample (strings or message lists).
        completion_ids: Token ids of each completion (passed as ``completion_ids``).
        columns: Further per-sample columns (``{"solution": [...]}``), passed as keyword
            arguments.
        reward_weights: One weight per function (default all 1).
        aggregation: ``multi_objective_aggregation``, see :func:`aggregate_rewards`.
        num_generations: Group size, needed by ``"normalize_then_sum"``.
        scale_rewards: How ``"normalize_then_sum"`` scales each reward, see :func:`aggregate_rewards`.
        trainer_state: Passed as ``trainer_state`` when given (TRL passes the Trainer's state).

    Raises:
        RewardFunctionError: A function raised (the message names it and the first sample it
            fails on, with its prompt), returned the wrong number of rewards, a non-number or NaN.

    A sample for which every function returned ``None`` gets a warning and a combined reward
    of 0.0 (its per-function rewards stay NaN): give every sample at least one applicable
    reward function.
    """
    funcs = _as_list(reward_funcs)
    if not funcs:
        raise ValueError("compute_rewards: give at least one reward function.")
    n = len(completions)
    kwargs = _call_kwargs(prompts, completions, completion_ids, columns, trainer_state, n)
    names = _unique_names([reward_func_name(f) for f in funcs])
    for fn, name in zip(funcs, names):
        _check_signature(fn, name, kwargs)
    results: list[list[float] | None] = [None] * len(funcs)
    async_idx = [i for i, f in enumerate(funcs) if _is_async(f)]
    runner = _AsyncRunner([(funcs[i], names[i]) for i in async_idx], kwargs, n) if async_idx else None
    if runner is not None:
        runner.start()
    for i, fn in enumerate(funcs):
        if i not in async_idx:
            results[i] = _call_sync(fn, names[i], kwargs, n)
    if runner is not None:
        for i, values in zip(async_idx, runner.join()):
            results[i] = values
    rpf = torch.tensor(results, dtype=torch.float32).T.reshape(n, len(funcs))  # (N, K)
    _warn_all_none(rpf, prompts)
    weights = _weights(reward_weights, len(funcs), rpf.device)
    rewards = aggregate_rewards(
        rpf, weights, aggregation=aggregation, num_generations=num_generations, scale_rewards=scale_rewards
    )
    return RewardOutput(names, rpf, weights, rewards, aggregation)


def _as_list(reward_funcs: Any) -> list[Callable[..., Any]]:
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for i, fn in enumerate(funcs):
        if isinstance(fn, (str, torch.nn.Module)):
            raise TypeError(
                f"reward_funcs[{i}] is a {'model name' if isinstance(fn, str) else 'model'}: load it once with "
                "`honelm.rewards.load_reward_funcs(...)` and pass the result."
            )
        if not callable(fn):
            raise TypeError(f"reward_funcs[{i}] must be callable, got {type(fn).__name__}.")
    return funcs


def _call_kwargs(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None,
    columns: Mapping[str, Sequence[Any]] | None,
    trainer_state: Any,
    n: int,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"prompts": list(prompts), "completions": list(completions)}
    if completion_ids is not None:
        kwargs["completion_ids"] = [list(ids) for ids in completion_ids]
    for name, values in (columns or {}).items():
        if name in _RESERVED:
            raise ValueError(
                f"column {name!r} clashes with the reward function argument of the same name; rename the column."
            )
        kwargs[name] = list(values)
    for name, values in kwargs.items():
        if len(values) != n:
            raise ValueError(f"compute_rewards: `{name}` has {len(values)} entries for {n} completions.")
    if trainer_state is not None:
        kwargs["trainer_state"] = trainer_state
    return kwargs


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _check_signature(fn: Callable[..., Any], name: str, kwargs: dict[str, Any]) -> None:
    """Fail before calling when ``fn`` cannot take the batch's keyword arguments."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        given = ", ".join(kwargs)
        raise RewardFunctionError(
            f"reward function {name!r} cannot be called with this batch's arguments ({given}): {exc}. A "
            "reward function receives prompts, completions, completion_ids and every dataset column as "
            "keyword arguments: add the missing column to the dataset, and take **kwargs for the rest."
        ) from None


def _call_sync(fn: Callable[..., Any], name: str, kwargs: dict[str, Any], n: int) -> list[float]:
    try:
        values = fn(**kwargs)
    except Exception as exc:
        raise _located_error(fn, name, kwargs, n, exc) from exc
    return _check_values(values, name, kwargs, n)


class _AsyncRunner:
    """Runs the async reward functions concurrently in an event loop of their own thread."""

    def __init__(self, funcs: list[tuple[Callable[..., Any], str]], kwargs: dict[str, Any], n: int) -> None:
        self.funcs, self.kwargs, self.n = funcs, kwargs, n
        self.outcomes: list[Any] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="honelm-async-rewards")

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        async def everything() -> list[Any]:
            return await asyncio.gather(*(fn(**self.kwargs) for fn, _ in self.funcs), return_exceptions=True)

        try:
            self.outcomes = asyncio.run(everything())
        except BaseException as exc:  # e.g. a function that is not really a coroutine function
            self.outcomes = [exc] * len(self.funcs)

    def join(self) -> list[list[float]]:
        self.thread.join()
        out = []
        for (fn, name), outcome in zip(self.funcs, self.outcomes):
            if isinstance(outcome, BaseException):
                raise _located_error(fn, name, self.kwargs, self.n, outcome) from outcome
            out.append(_check_values(outcome, name, self.kwargs, self.n))
        return out


def _one_sample(kwargs: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: (v[i : i + 1] if k != "trainer_state" else v) for k, v in kwargs.items()}


def _located_error(
    fn: Callable[..., Any], name: str, kwargs: dict[str, Any], n: int, exc: BaseException
) -> RewardFunctionError:
    """Find the first sample on which ``fn`` raises alone, and name it."""
    culprit = None
    for i in range(n):
        try:
            result = fn(**_one_sample(kwargs, i))
            if inspect.isawaitable(result):
                _run_in_thread(result)
        except Exception:
            culprit = i
            break
    what = f"{type(exc).__name__}: {exc}"
    if culprit is None:
        return RewardFunctionError(
            f"reward function {name!r} raised {what} on the batch of {n} samples (no single sample fails alone)."
        )
    return RewardFunctionError(
        f"reward function {name!r} raised {what} on sample {culprit} "
        f"(prompt: {_preview(kwargs['prompts'][culprit])}, completion: {_preview(kwargs['completions'][culprit])}). "
        "Fix the function, or make it return None for samples it does not apply to."
    )


async def _await(value: Any) -> Any:
    return await value


def _run_in_thread(awaitable: Any) -> Any:
    """Run an awaitable to completion in a fresh event loop on another thread (safe even when
    the caller's thread already runs a loop, as in notebooks); re-raise what it raises."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(_await(awaitable))
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _check_values(values: Any, name: str, kwargs: dict[str, Any], n: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # numpy arrays
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(values).__name__}; it must return a list with one "
            f"float (or None) per completion ({n})."
        )
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} rewards for {n} completions; return one per completion."
        )
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if not isinstance(v, (int, float)):  # bools count as 0 / 1
            if not (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
                raise RewardFunctionError(
                    f"reward function {name!r} returned {v!r} ({type(v).__name__}) for sample {i} "
                    f"(prompt: {_preview(kwargs['prompts'][i])}); rewards must be numbers, or None when not applicable."
                )
            v = v.item()
        v = float(v)
        if math.isnan(v):
            raise RewardFunctionError(
                f"reward function {name!r} returned NaN for sample {i} (prompt: {_preview(kwargs['prompts'][i])}); "
                "return None, not NaN, for samples it does not apply to."
            )
        out.append(v)
    return out


def _warn_all_none(rpf: torch.Tensor, prompts: Sequence[Any]) -> None:
    rows = torch.isnan(rpf).all(dim=1).nonzero().flatten().tolist()
    if not rows:
        return
    shown = ", ".join(f"{i} ({_preview(prompts[i], 40)})" for i in rows[:3])
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    warnings.warn(
        f"Every reward function returned None for {len(rows)} sample(s): {shown}{more}. Their reward counts "
        "as 0.0. Make sure at least one reward function applies to every sample.",
        RuntimeWarning,
        stacklevel=3,
    )


def _preview(value: Any, limit: int = 80) -> str:
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], Mapping):
        value = value[-1].get("content", value)
    text = str(value)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
