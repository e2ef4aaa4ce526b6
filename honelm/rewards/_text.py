"""Reading the text out of a completion, whichever form reward functions receive it in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _assistant_contents(completion: Any) -> list[str]:
    if isinstance(completion, str):
        return [completion]
    if isinstance(completion, Mapping):
        return [str(completion.get("content") or "")]
    if isinstance(completion, Sequence):
        contents = [
            str(m.get("content") or "")
            for m in completion
            if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"
        ]
        return contents
    raise TypeError(
        f"a completion must be a string or a list of messages, got {type(completion).__name__}: {str(completion)[:60]!r}."
    )


def final_text(completion: Any) -> str:
    """The completion's final answer text: the string itself, or the last assistant message's content."""
    contents = _assistant_contents(completion)
    return contents[-1] if contents else ""


def first_text(completion: Any) -> str:
    """The completion's opening text: the string itself, or the first assistant message's content."""
    contents = _assistant_contents(completion)
    return contents[0] if contents else ""
