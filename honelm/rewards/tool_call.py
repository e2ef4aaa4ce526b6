"""Tool-use rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from honelm.generation.tools import is_error_result


def tool_call_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """The fraction of a completion's tool calls that succeeded; 0.0 when it made none.

    Reads the ``tool`` messages of conversational completions as produced by
    :func:`honelm.generation.rollout` with ``tools``: a result whose content is a JSON object
    with an ``error`` key (a malformed call, an unknown tool, bad arguments, an exception or
    a timeout) is a failure, any other result a success. Plain-string completions have no
    tool results and get 0.0.

    Example::

        >>> ok = {"role": "tool", "name": "add", "content": "5"}
        >>> bad = {"role": "tool", "name": "add", "content": '{"error": "ZeroDivisionError: ..."}'}
        >>> call = {"role": "assistant", "content": ""}
        >>> tool_call_reward([[call, ok], [call, ok, bad], [{"role": "assistant", "content": "5"}]])
        [1.0, 0.5, 0.0]
    """
    rewards = []
    for completion in completions:
        results = []
        if isinstance(completion, Sequence) and not isinstance(completion, str):
            results = [m for m in completion if isinstance(m, Mapping) and m.get("role") == "tool"]
        if not results:
            rewards.append(0.0)
            continue
        successes = sum(not is_error_result(m.get("content")) for m in results)
        rewards.append(successes / len(results))
    return rewards
