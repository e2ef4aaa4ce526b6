"""Tools: schemas from signatures and docstrings, parsing tool calls, running them safely."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Literal

import pytest
from transformers.utils import get_json_schema

from honelm.generation import execute_tool_calls, is_error_result, parse_tool_calls, tool_schema
from honelm.generation.tools import ToolCall, strip_tool_calls, tool_suffix_ids
from honelm.testing import tiny_tokenizer


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor, which may be
            described on two lines.

    Returns:
        The product.
    """
    return a * b


def search(
    query: str, limit: int = 5, tags: list[str] | None = None, mode: Literal["fast", "exact"] = "fast"
) -> list[str]:
    """Search the notes.

    Args:
        query (str): Words to look for.
        limit: Most results to return.
        tags: Only notes with these tags.
        mode: How to match.
    """
    return [query] * limit


def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


def slow(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "done"


async def async_add(a: int, b: int) -> int:
    """Add, asynchronously."""
    await asyncio.sleep(0.01)
    return a + b


async def async_slow(seconds: float) -> str:
    """Sleep, asynchronously."""
    await asyncio.sleep(seconds)
    return "done"


def info() -> dict:
    """Facts."""
    return {"answer": 42}


# ---------------------------------------------------------------------------------- schemas


def test_schema_from_signature_and_google_docstring():
    schema = tool_schema(multiply)
    assert schema == {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The first factor."},
                    "b": {"type": "integer", "description": "The second factor, which may be described on two lines."},
                },
                "required": ["a", "b"],
            },
        },
    }


def test_schema_agrees_with_transformers_on_plain_functions():
    ours, theirs = tool_schema(multiply)["function"], get_json_schema(multiply)["function"]
    assert ours["name"] == theirs["name"] and ours["description"] == theirs["description"]
    assert ours["parameters"]["required"] == theirs["parameters"]["required"]
    for name, prop in ours["parameters"]["properties"].items():
        assert prop["type"] == theirs["parameters"]["properties"][name]["type"]


def test_schema_of_optional_list_literal_and_defaults():
    params = tool_schema(search)["function"]["parameters"]
    assert params["required"] == ["query"]
    assert params["properties"]["query"] == {"type": "string", "description": "Words to look for."}
    assert params["properties"]["tags"] == {
        "type": ["array", "null"],
        "items": {"type": "string"},
        "description": "Only notes with these tags.",
    }
    assert params["properties"]["limit"] == {"type": "integer", "description": "Most results to return."}
    assert params["properties"]["mode"]["enum"] == ["fast", "exact"]
    assert params["properties"]["mode"]["type"] == "string"
    assert "required" not in tool_schema(info)["function"]["parameters"]


def test_schema_errors_name_the_tool_and_parameter():
    def untyped(x):
        """No annotation."""

    def star(*args: int):
        """Varargs."""

    with pytest.raises(TypeError, match="parameter 'x' of tool 'untyped' has no type annotation"):
        tool_schema(untyped)
    with pytest.raises(TypeError, match="takes \\*args"):
        tool_schema(star)


def test_schema_renders_in_the_chat_template():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tools=[tool_schema(multiply)], tokenize=False, add_generation_prompt=True
    )
    assert '"name": "multiply"' in text and "<tools>" in text


# ---------------------------------------------------------------------------------- parsing


def test_parse_well_formed_calls_in_order():
    text = (
        'Let me compute.<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
        '<tool_call>{"name": "info", "arguments": "{}"}</tool_call>'
    )
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [("multiply", {"a": 3, "b": 4}, None), ("info", {}, None)]
    assert strip_tool_calls(text, calls) == "Let me compute."


@pytest.mark.parametrize(
    "body, error",
    [
        ("{not json}", "not valid JSON"),
        ('["multiply"]', "JSON object"),
        ('{"arguments": {}}', "no string `name`"),
        ('{"name": "multiply", "arguments": [1, 2]}', "must be a JSON object"),
        ('{"name": "multiply", "arguments": "{bad"}', "string is not valid JSON"),
    ],
)
def test_malformed_calls_are_reported_not_dropped(body, error):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.error is not None and error in call.error
    assert strip_tool_calls(f"x <tool_call>{body}</tool_call>", [call]).endswith("</tool_call>")  # stays visible


def test_unclosed_call_and_no_call():
    (call,) = parse_tool_calls('ok <tool_call>{"name": "multiply"')
    assert "never closed" in call.error
    assert parse_tool_calls("The answer is 12.") == []


def test_parameters_key_is_accepted():
    (call,) = parse_tool_calls('<tool_call>{"name": "multiply", "parameters": {"a": 1, "b": 2}}</tool_call>')
    assert call.arguments == {"a": 1, "b": 2} and call.error is None


# -------------------------------------------------------------------------------- executing


def test_results_errors_and_unknown_tools_in_order():
    tools = [multiply, divide, info]
    calls = [
        ToolCall("multiply", {"a": 3, "b": 4}),
        ToolCall("divide", {"a": 1, "b": 0}),
        ToolCall("nope", {}),
        ToolCall("multiply", {"a": 3}),
        ToolCall("", error="the tool call is not valid JSON"),
        ToolCall("info", {}),
    ]
    results = execute_tool_calls(calls, tools)
    assert [r.name for r in results] == ["multiply", "divide", "nope", "multiply", "", "info"]
    assert results[0].content == "12" and results[0].error is None
    assert "ZeroDivisionError" in results[1].error and is_error_result(results[1].content)
    assert "unknown tool 'nope'" in results[2].error and "divide, info, multiply" in results[2].error
    assert "bad arguments" in results[3].error and "'b'" in results[3].error
    assert "malformed tool call" in results[4].error
    assert json.loads(results[5].content) == {"answer": 42} and not is_error_result(results[5].content)
    assert results[1].as_message() == {"role": "tool", "name": "divide", "content": results[1].content}


def test_timeouts_become_error_results_without_blocking():
    start = time.monotonic()
    results = execute_tool_calls(
        [ToolCall("slow", {"seconds": 5}), ToolCall("slow", {"seconds": 5}), ToolCall("slow", {"seconds": 0})],
        [slow],
        timeout=0.3,
    )
    assert time.monotonic() - start < 2.0  # both slow calls share one deadline
    assert "TimeoutError" in results[0].error and "TimeoutError" in results[1].error
    assert results[2].content == "done"


def test_async_tools_run_and_time_out():
    results = execute_tool_calls(
        [ToolCall("async_add", {"a": 2, "b": 5}), ToolCall("async_slow", {"seconds": 5})],
        [async_add, async_slow],
        timeout=0.3,
    )
    assert results[0].content == "7"
    assert "TimeoutError" in results[1].error


def test_a_tool_exception_inside_is_not_mistaken_for_bad_arguments():
    def bad_inside(x: int) -> int:
        """Raises TypeError itself."""
        return x + "a"  # type: ignore[operator]

    (result,) = execute_tool_calls([ToolCall("bad_inside", {"x": 1})], [bad_inside])
    assert result.error.startswith("TypeError") and "bad arguments" not in result.error


def test_duplicate_tool_names_are_refused():
    def multiply(a: int) -> int:  # deliberately shadows the module-level tool
        """Other."""
        return a

    from honelm.generation.tools import tools_by_name

    with pytest.raises(ValueError, match="two different tools are named 'multiply'"):
        tools_by_name([globals()["multiply"], multiply])


# --------------------------------------------------------------------------- token suffixes


def test_suffix_is_the_tool_turn_and_next_assistant_header():
    tok = tiny_tokenizer()
    messages = [{"role": "tool", "name": "multiply", "content": "12"}]
    suffix = tok.decode(tool_suffix_ids(tok, messages))
    assert suffix == "\n<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n"


def test_suffix_makes_the_rollout_equal_the_rendered_conversation():
    """Generated turn (ending with EOS) + suffix + next turn == the chat template's rendering."""
    tok = tiny_tokenizer()
    prompt = [{"role": "user", "content": "What is 3 * 4?"}]
    call = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    tool_msg = {"role": "tool", "name": "multiply", "content": "12"}
    ids = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids += call + "<|im_end|>" + tok.decode(tool_suffix_ids(tok, [tool_msg])) + "12<|im_end|>"
    full = prompt + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}],
        },
        tool_msg,
        {"role": "assistant", "content": "12"},
    ]
    assert ids + "\n" == tok.apply_chat_template(full, tokenize=False)


def test_suffix_needs_a_prefix_preserving_template():
    tok = tiny_tokenizer(chat_template="{% for m in messages|reverse %}{{ m['content'] }}<|im_end|>{% endfor %}")
    with pytest.raises(ValueError, match="prefix-preserving"):
        tool_suffix_ids(tok, [{"role": "tool", "content": "1"}])
