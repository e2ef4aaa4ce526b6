"""Length rewards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13).

    A completion of ``L`` tokens, with ``L_max = max_completion_len`` and
    ``L_cache = soft_punish_cache``, gets::

        0                                  if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
        -1                                 if L > L_max

    i.e. nothing until the last ``L_cache`` tokens of the budget, then a penalty growing
    linearly to ``-1``. It reads ``completion_ids`` and is meant to be added to a task reward.

    Example::

        >>> punish = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
        >>> punish(completion_ids=[[0] * 70, [0] * 90, [0] * 110])
        [0.0, -0.5, -1.0]
    """
    if max_completion_len < 1:
        raise ValueError(f"get_soft_overlong_punishment: max_completion_len must be >= 1, got {max_completion_len}.")
    if not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(
            "get_soft_overlong_punishment: soft_punish_cache must be in [0, max_completion_len] "
            f"= [0, {max_completion_len}], got {soft_punish_cache}."
        )
    safe = max_completion_len - soft_punish_cache

    def soft_overlong_punishment(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= safe:
                rewards.append(0.0)
            elif length <= max_completion_len:
                rewards.append((safe - length) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return soft_overlong_punishment
