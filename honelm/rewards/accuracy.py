"""Answer accuracy: is the completion's final answer the reference solution?"""

from __future__ import annotations

import importlib.util
import re
import threading
from fractions import Fraction
from typing import Any

from ._text import final_text

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"^\\d?frac\{(-?\d+)\}\{(-?\d+)\}$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def accuracy_reward(completions: list[Any], solution: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 when a completion's answer equals the reference ``solution``, else 0.0.

    - With `math-verify <https://github.com/huggingface/Math-Verify>`_ installed
      (``pip install math-verify``), the completion and the solution are parsed as math (LaTeX
      or plain expressions, ``\\boxed{}`` preferred) and compared symbolically, so
      ``\\frac{1}{2}`` matches ``0.5``. A solution that math-verify cannot parse falls back to
      the normalized comparison below.
    - Without it, the answer is the content of the last ``\\boxed{...}``, else of the last
      ``<answer>...</answer>``, else the text after ``</think>``, else the whole completion
      (the last assistant message, for conversational data). Answer and solution are
      compared after normalization: surrounding ``$``/``\\(``, ``\\text{}`` wrappers, spaces,
      case, a final period and thousands separators are ignored, and numbers (including
      fractions like ``3/4`` or ``\\frac{3}{4}``) compare by value.

    Samples with an empty solution get ``None`` (not applicable).

    Args:
        completions: Completions as strings or message lists.
        solution: Reference answers, one per completion (TRL's column name). An ``answer``
            column is used when there is no ``solution`` column.
    """
    if solution is None:
        solution = kwargs.get("answer")
    if solution is None:
        raise ValueError(
            "accuracy_reward needs the reference answers: add a `solution` column to the dataset "
            "(an `answer` column works too)."
        )
    if len(solution) != len(completions):
        raise ValueError(f"accuracy_reward: {len(solution)} solutions for {len(completions)} completions.")
    math = _math_verify()
    rewards: list[float | None] = []
    for completion, gold in zip(completions, solution):
        gold_text = "" if gold is None else str(gold).strip()
        if not gold_text:
            rewards.append(None)
            continue
        text = final_text(completion)
        verified = _verify_math(math, gold_text, text) if math is not None else None
        if verified is None:
            verified = normalize_answer(extract_answer(text)) == normalize_answer(gold_text)
        rewards.append(1.0 if verified else 0.0)
    return rewards


def _math_verify() -> Any:
    if importlib.util.find_spec("math_verify") is None:
        return None
    import math_verify

    return math_verify


def _verify_math(math: Any, gold: str, text: str) -> bool | None:
    """math-verify's verdict, or ``None`` when the solution does not parse as math."""
    # math-verify's time limits use signals, which only the main thread may set.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = math.parse(gold, parsing_timeout=limit)
    if not gold_parsed:
        return None
    answer_parsed = math.parse(text, parsing_timeout=limit)
    return bool(math.verify(gold_parsed, answer_parsed, timeout_seconds=limit))


def extract_answer(text: str) -> str:
    """The answer part of a completion: last ``\\boxed{}``, else last ``<answer>``, else after
    ``</think>``, else the whole text."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return text


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 1, start + len("\\boxed{")
    begin = i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin : i - 1] if depth == 0 else None


def normalize_answer(text: str) -> str:
    """A canonical form for comparing answers (see :func:`accuracy_reward`)."""
    s = text.strip().rstrip(".").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        while len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.rstrip(".").strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = "".join(s.split()).lower()
    value = _number(s)
    return f"#{value}" if value is not None else s


def _number(s: str) -> Fraction | None:
    frac = _FRAC.match(s)
    if frac:
        num, den = int(frac.group(1)), int(frac.group(2))
        return Fraction(num, den) if den else None
    try:
        if "/" in s:
            num_text, den_text = s.split("/", 1)
            return Fraction(int(num_text), int(den_text)) if int(den_text) else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
