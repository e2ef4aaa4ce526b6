"""Built-in reward functions, each against values worked out by hand."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from honelm.generation.tools import ToolCall, execute_tool_calls
from honelm.rewards import accuracy as accuracy_module
from honelm.rewards import accuracy_reward, get_soft_overlong_punishment, think_format_reward, tool_call_reward
from honelm.rewards.accuracy import extract_answer, normalize_answer


@pytest.fixture
def no_math_verify(monkeypatch):
    monkeypatch.setattr(accuracy_module, "_math_verify", lambda: None)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("7", "7", 1.0),
        ("8", "7", 0.0),
        (" 7. ", "7", 1.0),
        ("The sum is \\boxed{7}", "7", 1.0),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("<think>3 + 4 is 7</think> 7", "7", 1.0),
        ("<think>maybe 8</think>\n<answer>7</answer>", "7", 1.0),
        ("$7$", "7", 1.0),
        ("1,000", "1000", 1.0),
        ("3/4", "0.75", 1.0),
        ("\\(\\frac{3}{4}\\)", "3/4", 1.0),
        ("\\text{Paris}", "paris", 1.0),
        ("The answer is 7", "7", 0.0),  # without math-verify the answer must stand alone (or be boxed)
        ("7", "", None),
        ("7", None, None),
    ],
)
def test_accuracy_by_normalized_match(no_math_verify, completion, solution, expected):
    assert accuracy_reward([completion], solution=[solution]) == [expected]


def test_accuracy_reads_the_last_assistant_message_and_the_answer_column(no_math_verify):
    completions = [
        [
            {"role": "assistant", "content": "let me check"},
            {"role": "tool", "content": "7"},
            {"role": "assistant", "content": "7"},
        ],
        [{"role": "assistant", "content": "9"}],
    ]
    assert accuracy_reward(completions, answer=["7", "7"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="`solution` column"):
        accuracy_reward(["7"])


def test_answer_extraction_and_normalization():
    assert extract_answer("a \\boxed{x^{2}} b") == "x^{2}"
    assert extract_answer("\\boxed{unclosed") == "\\boxed{unclosed"
    assert normalize_answer(" $\\frac{2}{4}$. ") == normalize_answer("0.5") == "#1/2"
    assert normalize_answer("Hello World") == "helloworld"


@pytest.fixture
def fake_math_verify(monkeypatch):
    """A stand-in with math-verify's API: parses numbers only, verifies by value."""
    module = types.ModuleType("math_verify")
    module.__spec__ = importlib.machinery.ModuleSpec("math_verify", None)
    calls = []

    def parse(text, parsing_timeout=5):
        calls.append(("parse", text, parsing_timeout))
        words = [w.strip("$.") for w in text.replace("\\boxed{", " ").replace("}", " ").split()]
        numbers = [float(w) for w in words if w.replace(".", "", 1).lstrip("-").isdigit()]
        return numbers[-1:]

    def verify(gold, target, timeout_seconds=5):
        calls.append(("verify", gold, target, timeout_seconds))
        return bool(target) and gold[0] == target[0]

    module.parse, module.verify, module.calls = parse, verify, calls
    monkeypatch.setitem(sys.modules, "math_verify", module)
    return module


def test_accuracy_uses_math_verify_when_installed(fake_math_verify):
    rewards = accuracy_reward(["The answer is 7", "It is 8", "Paris"], solution=["7.0", "7", "paris"])
    # math-verify reads "The answer is 7" (normalized matching would not); "paris" does not parse as
    # math, so it falls back to the normalized comparison.
    assert rewards == [1.0, 0.0, 1.0]
    assert ("parse", "7.0", 5) in fake_math_verify.calls  # main thread: time limits on


def test_accuracy_turns_math_verify_time_limits_off_outside_the_main_thread(fake_math_verify):
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(accuracy_reward(["7"], solution=["7"])))
    thread.start()
    thread.join()
    assert out == [[1.0]]
    assert all(call[-1] is None for call in fake_math_verify.calls)


def test_accuracy_with_the_real_math_verify():
    pytest.importorskip("math_verify")
    completions = ["My answer is \\boxed{\\frac{1}{3}}", "My answer is \\boxed{\\frac{1}{2}}", "so x = 0.5"]
    assert accuracy_reward(completions, solution=["\\frac{1}{3}", "\\frac{1}{3}", "1/2"]) == [1.0, 0.0, 1.0]


# -------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>\nreasoning\n</think>\nanswer", 1.0),
        ("  <think>short</think>answer", 1.0),
        ("<think></think>answer", 1.0),
        ("<think>\nreasoning\nanswer", 0.0),
        ("reasoning</think>answer", 0.0),
        ("answer <think>late</think>", 0.0),
        ("<think>a</think><think>b</think>", 0.0),
        ("<think>a</think>b</think>", 0.0),
        ("plain answer", 0.0),
        ([{"role": "assistant", "content": "<think>r</think>a"}], 1.0),
    ],
)
def test_think_format(completion, expected):
    assert think_format_reward([completion]) == [expected]


# -------------------------------------------------------------------------------- length


def test_soft_overlong_punishment_by_hand():
    punish = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    lengths = [0, 80, 81, 90, 99, 100, 101, 500]
    expected = [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    rewards = punish(completion_ids=[[1] * n for n in lengths])
    assert rewards == pytest.approx(expected)
    assert punish.__name__ == "soft_overlong_punishment"
    hard = get_soft_overlong_punishment(10, 0)
    assert hard(completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]


def test_soft_overlong_punishment_checks_its_arguments():
    with pytest.raises(ValueError, match="soft_punish_cache"):
        get_soft_overlong_punishment(10, 11)
    with pytest.raises(ValueError, match="max_completion_len"):
        get_soft_overlong_punishment(0, 0)


# --------------------------------------------------------------------------------- tools


def add(a: int, b: int) -> int:
    """Add."""
    return a + b


def test_tool_call_reward_from_executed_results():
    ok, bad, unknown = execute_tool_calls(
        [ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 1}), ToolCall("nope", {})], [add]
    )
    turn = {"role": "assistant", "content": ""}
    completions = [
        [turn, ok.as_message(), {"role": "assistant", "content": "3"}],
        [turn, ok.as_message(), bad.as_message(), unknown.as_message()],
        [turn, bad.as_message()],
        [{"role": "assistant", "content": "3"}],
        "3",
    ]
    assert tool_call_reward(completions) == pytest.approx([1.0, 1 / 3, 0.0, 0.0, 0.0])
    # A tool that returns a dict with an "error" key reports a failure too; other JSON does not.
    assert tool_call_reward(
        [[{"role": "tool", "content": '{"error": "not found"}'}, {"role": "tool", "content": '{"x": 1}'}]]
    ) == [0.5]
