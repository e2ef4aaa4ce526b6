"""Format rewards."""

from __future__ import annotations

from typing import Any

from ._text import first_text

_OPEN, _CLOSE = "<think>", "</think>"


def think_format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when a completion reasons inside one ``<think>...</think>`` block that opens it, else 0.0.

    The completion (its first assistant message, for conversational data) must start with
    ``<think>`` (leading whitespace aside), contain exactly one ``<think>`` and one ``</think>``,
    in that order; the answer follows the closing tag.

    Example::

        >>> think_format_reward(["<think>\\n2 + 2 = 4\\n</think>\\n4", "<think>no end", "4"])
        [1.0, 0.0, 0.0]
    """
    rewards = []
    for completion in completions:
        text = first_text(completion).lstrip()
        ok = (
            text.startswith(_OPEN)
            and text.count(_OPEN) == 1
            and text.count(_CLOSE) == 1
            and text.index(_CLOSE) > text.index(_OPEN)
        )
        rewards.append(1.0 if ok else 0.0)
    return rewards
