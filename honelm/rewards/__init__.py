"""Reward functions for online RL, and the plumbing that calls them.

Built-in rewards (all take ``completions`` plus the dataset columns they need, and
``**kwargs``; TRL's names and signatures):

- :func:`accuracy_reward`: the answer matches the ``solution`` column (math-verify when
  installed, normalized exact match otherwise);
- :func:`think_format_reward`: reasoning sits in one leading ``<think>...</think>`` block;
- :func:`get_soft_overlong_punishment`: DAPO's soft penalty for completions near the length limit;
- :func:`tool_call_reward`: the fraction of tool calls that succeeded.

Plumbing: :func:`compute_rewards` calls sync and async reward functions and
:class:`RewardModel`\\ s, names the function and sample when one fails, and combines several
rewards (:func:`aggregate_rewards`, ``sum_then_normalize`` / ``normalize_then_sum``);
:func:`load_reward_funcs` turns model names and models into reward functions once.

Names are imported on first use, so ``import honelm.rewards`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # built-in rewards
    "accuracy_reward": "honelm.rewards.accuracy",
    "get_soft_overlong_punishment": "honelm.rewards.length",
    "think_format_reward": "honelm.rewards.format_rewards",
    "tool_call_reward": "honelm.rewards.tool_call",
    # plumbing
    "AGGREGATIONS": "honelm.rewards.compute",
    "RewardFunctionError": "honelm.rewards.compute",
    "RewardOutput": "honelm.rewards.compute",
    "aggregate_rewards": "honelm.rewards.compute",
    "compute_rewards": "honelm.rewards.compute",
    "reward_func_name": "honelm.rewards.compute",
    "RewardModel": "honelm.rewards.models",
    "load_reward_funcs": "honelm.rewards.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'honelm.rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from .accuracy import accuracy_reward
    from .compute import (
        AGGREGATIONS,
        RewardFunctionError,
        RewardOutput,
        aggregate_rewards,
        compute_rewards,
        reward_func_name,
    )
    from .format_rewards import think_format_reward
    from .length import get_soft_overlong_punishment
    from .models import RewardModel, load_reward_funcs
    from .tool_call import tool_call_reward
