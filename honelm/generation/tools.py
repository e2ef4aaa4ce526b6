"""Tools for multi-turn rollouts: JSON schemas, parsing tool calls, running them.

A tool is a plain Python function (sync or async) with type-annotated parameters and a
Google-style docstring::

    def multiply(a: int, b: int) -> int:
        \"\"\"Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        \"\"\"
        return a * b

:func:`tool_schema` turns it into the JSON schema that chat templates render
(``{"type": "function", "function": {"name", "description", "parameters"}}``).

Models call tools Qwen/Hermes style, a JSON object inside ``<tool_call>`` tags (the format of
:func:`honelm.testing.tiny_tokenizer`'s template)::

    <tool_call>
    {"name": "multiply", "arguments": {"a": 3, "b": 4}}
    </tool_call>

:func:`parse_tool_calls` finds them in generated text and :func:`execute_tool_calls` runs them
with a time limit. A failure never raises: a malformed call, an unknown tool, bad arguments,
an exception or a timeout becomes a tool result ``{"error": "<what happened>"}`` that the model
reads in its next turn, and :func:`is_error_result` recognizes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPEN_TAG = "<tool_call>"
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Notes?)\s*:\s*$")
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")


# ---------------------------------------------------------------------------------- schemas


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a tool function, from its signature and Google-style docstring.

    Parameter types come from the annotations (``int`` -> ``integer``, ``float`` -> ``number``,
    ``str`` -> ``string``, ``bool`` -> ``boolean``, ``list[X]`` -> array of X, ``dict`` ->
    object, ``Literal[...]`` -> enum, ``X | None`` -> ``[X, "null"]``); descriptions come from
    the docstring's summary and its ``Args:`` section. Parameters without a default are
    required.

    Raises:
        TypeError: ``fn`` is not a function, a parameter has no type annotation, or it
            takes ``*args`` / ``**kwargs``.
    """
    if not callable(fn) or not hasattr(fn, "__name__"):
        raise TypeError(f"tool_schema: a tool must be a named Python function, got {type(fn).__name__}.")
    name = fn.__name__
    summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = dict(getattr(fn, "__annotations__", {}))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"tool_schema: tool {name!r} takes *{pname}; tools need named parameters the model can fill in."
            )
        if pname not in hints:
            raise TypeError(
                f"tool_schema: parameter {pname!r} of tool {name!r} has no type annotation. "
                f"Annotate it (e.g. `{pname}: int`) so the model knows what to pass."
            )
        prop = _json_type(hints[pname], name, pname)
        if pname in arg_docs:
            prop["description"] = arg_docs[pname]
        properties[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"type": "function", "function": {"name": name, "description": summary, "parameters": parameters}}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """``(summary, {arg: description})`` of a Google-style docstring."""
    summary_lines: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    arg_indent: int | None = None
    for line in doc.splitlines():
        heading = _SECTION.match(line)
        if heading:
            section, current, arg_indent = heading.group(1).lower(), None, None
            continue
        if section is None:
            summary_lines.append(line.strip())
            continue
        if section not in ("args", "arguments", "parameters") or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        match = _ARG_LINE.match(line.strip())
        if match and (arg_indent is None or indent <= arg_indent):
            arg_indent = indent
            current = match.group(1).lstrip("*")
            args[current] = match.group(3).strip()
        elif current is not None:
            args[current] = (args[current] + " " + line.strip()).strip()
    summary = " ".join(" ".join(summary_lines).split())
    return summary, args


def _json_type(annotation: Any, tool: str, param: str) -> dict[str, Any]:
    simple = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
    if annotation in simple:
        return {"type": simple[annotation]}
    if annotation is Any:
        return {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [_json_type(a, tool, param) for a in args]
        kinds = [m.get("type") for m in members]
        extras = [{k: v for k, v in m.items() if k != "type"} for m in members]
        if all(isinstance(k, str) for k in kinds) and sum(bool(e) for e in extras) <= 1:
            merged: dict[str, Any] = {"type": kinds}  # e.g. Optional[list[str]] -> array or null
            for extra in extras:
                merged.update(extra)
            return merged
        return {"anyOf": members}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        out: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1 and next(iter(kinds)) in simple:
            out["type"] = simple[next(iter(kinds))]
        return out
    if annotation in (list, tuple, set) or origin in (list, tuple, set, Sequence):
        out = {"type": "array"}
        if args and origin is not tuple:
            out["items"] = _json_type(args[0], tool, param)
        elif args and origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            out["prefixItems"] = [_json_type(a, tool, param) for a in args]
        elif args:
            out["items"] = _json_type(args[0], tool, param)
        return out
    if annotation is dict or origin in (dict, Mapping):
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _json_type(args[1], tool, param)
        return out
    raise TypeError(
        f"tool_schema: parameter {param!r} of tool {tool!r} has type {annotation!r}, which has no JSON schema. "
        "Use int, float, str, bool, list[...], dict[...], Literal[...] or Optional[...] of those."
    )


# ---------------------------------------------------------------------------------- parsing


@dataclass
class ToolCall:
    """One tool call found in generated text.

    Attributes:
        name: The tool's name (``""`` when it could not be read).
        arguments: The arguments as a dict.
        error: Why the call is malformed, or ``None`` for a well-formed call.
        text: The raw text of the call, tags included.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    text: str = ""

    def as_message_call(self) -> dict[str, Any]:
        """The call in the ``tool_calls`` format of chat messages."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str) -> list[ToolCall]:
    """All ``<tool_call>{json}</tool_call>`` blocks of ``text``, in order.

    The JSON must be an object with a string ``name`` and an object ``arguments`` (also
    accepted: ``parameters``, or the arguments as a JSON string). A block that breaks these
    rules, and an opening ``<tool_call>`` that is never closed, give a :class:`ToolCall` whose
    ``error`` says what is wrong, so that the model can be told.
    """
    calls: list[ToolCall] = []
    end = 0
    for match in _TOOL_CALL.finditer(text):
        calls.append(_parse_one(match.group(1), match.group(0)))
        end = match.end()
    tail = text.find(_OPEN_TAG, end)
    if tail != -1:
        calls.append(ToolCall("", error="the <tool_call> tag is never closed with </tool_call>", text=text[tail:]))
    return calls


def _parse_one(body: str, raw: str) -> ToolCall:
    try:
        payload = json.loads(body.strip())
    except json.JSONDecodeError as exc:
        return ToolCall("", error=f"the tool call is not valid JSON ({exc.msg} at char {exc.pos})", text=raw)
    if not isinstance(payload, dict):
        return ToolCall("", error="the tool call must be a JSON object with `name` and `arguments`", text=raw)
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall("", error="the tool call has no string `name`", text=raw)
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return ToolCall(name, error="the tool call's `arguments` string is not valid JSON", text=raw)
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return ToolCall(name, error="the tool call's `arguments` must be a JSON object", text=raw)
    return ToolCall(name, arguments, text=raw)


def strip_tool_calls(text: str, calls: Sequence[ToolCall]) -> str:
    """``text`` without the raw text of the well-formed ``calls`` (malformed ones stay visible)."""
    for call in calls:
        if call.error is None and call.text:
            text = text.replace(call.text, "", 1)
    return text.strip()


# -------------------------------------------------------------------------------- executing


@dataclass
class ToolResult:
    """The outcome of one tool call.

    Attributes:
        name: The tool called (``""`` for a malformed call).
        content: The text the model reads: the return value (strings as they are, other
            values as JSON), or ``{"error": "..."}`` on failure.
        error: ``None`` on success, else what went wrong.
    """

    name: str
    content: str
    error: str | None = None

    def as_message(self) -> dict[str, Any]:
        """The result as a ``tool`` chat message."""
        return {"role": "tool", "name": self.name, "content": self.content}


def tools_by_name(
    tools: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]],
) -> dict[str, Callable[..., Any]]:
    """``{name: function}`` for a list of tool functions (or a mapping, checked)."""
    if isinstance(tools, Mapping):
        table = dict(tools)
    else:
        table = {}
        for fn in tools:
            if not callable(fn):
                raise TypeError(f"tools: every tool must be a callable, got {type(fn).__name__}.")
            name = getattr(fn, "__name__", None)
            if not name:
                raise TypeError(f"tools: {fn!r} has no __name__; tools are found by their function name.")
            if name in table and table[name] is not fn:
                raise ValueError(f"tools: two different tools are named {name!r}; give them distinct names.")
            table[name] = fn
    return table


def execute_tool_calls(
    calls: Sequence[ToolCall],
    tools: Sequence[Callable[..., Any]] | Mapping[str, Callable[..., Any]],
    *,
    timeout: float | None = 30.0,
) -> list[ToolResult]:
    """Run ``calls`` concurrently and return one :class:`ToolResult` per call, in order.

    Sync tools run in daemon threads, async tools in an event loop of their own thread.
    ``timeout`` (seconds, per call; ``None`` waits forever) turns a slow call into an error
    result. A timed-out sync tool cannot be stopped from outside: its thread is abandoned
    (it does not keep the interpreter from exiting), and whatever it returns is discarded.
    """
    table = tools_by_name(tools)
    results: list[ToolResult | None] = [None] * len(calls)
    workers: list[tuple[int, threading.Thread, dict[str, Any]]] = []
    for i, call in enumerate(calls):
        if call.error is not None:
            results[i] = _error(call.name, f"malformed tool call: {call.error}")
        elif call.name not in table:
            available = ", ".join(sorted(table)) or "none"
            results[i] = _error(call.name, f"unknown tool {call.name!r}; available tools: {available}")
        else:
            box: dict[str, Any] = {}
            thread = threading.Thread(
                target=_run_tool,
                args=(table[call.name], call.arguments, timeout, box),
                daemon=True,
                name=f"honelm-tool-{call.name}",
            )
            thread.start()
            workers.append((i, thread, box))
    deadline = None if timeout is None else time.monotonic() + timeout
    for i, thread, box in workers:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        name = calls[i].name
        if thread.is_alive() or box.get("timeout"):
            results[i] = _error(name, f"TimeoutError: tool {name!r} did not finish within {timeout} s")
        elif "error" in box:
            results[i] = _error(name, box["error"])
        else:
            results[i] = ToolResult(name, _render(box.get("value")))
    return [r for r in results if r is not None]


def _run_tool(fn: Callable[..., Any], arguments: dict[str, Any], timeout: float | None, box: dict[str, Any]) -> None:
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as exc:
        box["error"] = f"TypeError: bad arguments {json.dumps(arguments, default=str)}: {exc}"
        return
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    try:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
            box["value"] = asyncio.run(asyncio.wait_for(fn(**arguments), timeout))
        else:
            value = fn(**arguments)
            if inspect.isawaitable(value):
                value = asyncio.run(asyncio.wait_for(_await(value), timeout))
            box["value"] = value
    except (asyncio.TimeoutError, TimeoutError) as exc:
        box["timeout"] = True
        box["error"] = f"TimeoutError: {exc}"
    except BaseException as exc:  # the model must see every failure, including SystemExit from user code
        box["error"] = f"{type(exc).__name__}: {exc}"


async def _await(value: Any) -> Any:
    return await value


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _error(name: str, message: str) -> ToolResult:
    return ToolResult(name, json.dumps({"error": message}, ensure_ascii=False), error=message)


def is_error_result(content: Any) -> bool:
    """Whether a tool message's content reports a failure (a JSON object with an ``error`` key)."""
    if not isinstance(content, str) or not content.lstrip().startswith("{"):
        return False
    try:
        payload = json.loads(content)
    except json.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "error" in payload


# --------------------------------------------------------------------------- token suffixes


def tool_suffix_ids(
    tokenizer: Any,
    tool_messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids to append after an assistant turn that ended with EOS: the rest of that turn
    as the chat template closes it, the ``tool`` messages, and the next assistant header.

    The suffix is found on a dummy conversation, rendered once without and once with the
    tool messages: the second rendering must extend the first (a prefix-preserving
    template), and the assistant turn must end with the tokenizer's EOS token.
    """
    kwargs = dict(chat_template_kwargs or {})
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "dummy"}]
    before = tokenizer.apply_chat_template(dummy, tools=tools, tokenize=False, **kwargs)
    after = tokenizer.apply_chat_template(
        dummy + [dict(m) for m in tool_messages], tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
    )
    if not after.startswith(before):
        raise ValueError(
            "Tool calling needs a prefix-preserving chat template: rendering a conversation with tool "
            "results appended must extend the rendering without them, but this template rewrites earlier "
            "turns. Use a template that renders earlier turns unchanged."
        )
    eos = tokenizer.eos_token
    cut = before.rfind(eos) if eos else -1
    if cut == -1:
        raise ValueError(
            f"Tool calling: the chat template does not end assistant turns with the EOS token {eos!r}, so the "
            "rollout cannot tell where the model's turn ends. Set the tokenizer's eos_token to the "
            "end-of-turn token."
        )
    suffix = before[cut + len(eos) :] + after[len(before) :]
    return tokenizer(suffix, add_special_tokens=False)["input_ids"]
