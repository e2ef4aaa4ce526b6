"""From prompts to scored-ready rollouts: chat templating, generation, multi-turn tool use.

    from honelm.generation import SamplingParams, TransformersBackend, rollout

    backend = TransformersBackend(model, tokenizer, SamplingParams(temperature=1.0), max_completion_length=128)
    out = rollout(backend, prompts, tokenizer, num_generations=8, tools=[multiply])
    batch = out.to_tensors(tokenizer.pad_token_id)   # completion_ids, completion_mask, logps, tool_mask, ...

With ``tools``, each rollout is a conversation: generate until EOS -> parse the tool calls ->
run them -> append the ``tool`` messages as the chat template renders them -> generate the
next assistant turn, until a turn has no tool call, ``max_tool_calling_iterations`` tool
rounds were run, or the completion budget is spent. Tool-result tokens are part of
``completion_ids`` (the model conditions on them) but ``tool_mask`` is ``0`` on them, so they
never enter the loss.

A custom environment replaces all of this with a ``rollout_func(prompts, trainer) -> dict``
(TRL's hook); :func:`rollout_from_dict` checks and converts what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .outputs import GenerationOutput, RolloutOutput
from .sampling import SamplingParams
from .tools import (
    ToolCall,
    ToolResult,
    execute_tool_calls,
    parse_tool_calls,
    strip_tool_calls,
    tool_schema,
    tool_suffix_ids,
    tools_by_name,
)

RolloutFunc = Callable[[list[Any], Any], dict[str, Any]]
"""A custom rollout: ``rollout_func(prompts, trainer) -> dict`` (TRL's hook).

It receives the batch's prompts (already repeated ``num_generations`` times) and the trainer,
and returns a dict with one entry per prompt in each of ``"prompt_ids"``, ``"completion_ids"``
and ``"logprobs"`` (or ``"logps"``: sampling log-probs, one per completion token), optionally
``"tool_mask"`` (``0`` on tokens not to train on), ``"truncated"`` and ``"completions"`` (what
reward functions see; decoded from the ids otherwise). Any other key must hold one value per
prompt and is passed to the reward functions as a keyword argument of that name.
"""


class RolloutBackend(Protocol):
    """What :func:`rollout` needs from a generation backend (transformers, vLLM, or your own)."""

    max_completion_length: int

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> GenerationOutput: ...


# ---------------------------------------------------------------------------------- prompts


def is_conversational_prompt(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages (as opposed to a plain string)."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], Mapping)


def prepare_prompts(
    prompts: Sequence[Any],
    tokenizer: Any,
    *,
    tools: Sequence[Callable[..., Any]] | None = None,
    max_prompt_length: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt.

    Conversational prompts go through the chat template with the generation prompt (and the
    tools' schemas); one that ends with an assistant message is continued instead. Plain
    strings are tokenized as they are (with the tokenizer's special tokens, e.g. BOS).
    ``max_prompt_length`` keeps the last tokens of longer prompts.
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}.")
    conversational = _prompt_style(prompts)
    schemas = [tool_schema(fn) for fn in tools_by_name(tools).values()] if tools else None
    ids: list[list[int]] = []
    for prompt in prompts:
        if conversational:
            continue_final = prompt[-1].get("role") == "assistant"
            text = tokenizer.apply_chat_template(
                list(prompt),
                tools=schemas,
                tokenize=False,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                **dict(chat_template_kwargs or {}),
            )
            row = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            row = tokenizer(prompt)["input_ids"]
        if max_prompt_length is not None and len(row) > max_prompt_length:
            row = row[-max_prompt_length:]
        ids.append(list(row))
    return ids


def _prompt_style(prompts: Sequence[Any]) -> bool:
    """``True`` for conversational prompts, ``False`` for strings; mixed or other -> error."""
    if not prompts:
        return False
    first = is_conversational_prompt(prompts[0])
    for i, prompt in enumerate(prompts):
        if is_conversational_prompt(prompt) != first or not (first or isinstance(prompt, str)):
            expected = "a list of messages" if first else "a string"
            raise ValueError(
                f"prompt {i}: expected {expected} like prompt 0, got {type(prompt).__name__} "
                f"({str(prompt)[:60]!r}). All prompts of a batch must be plain strings or all lists of "
                "{'role', 'content'} messages."
            )
    return first


# ---------------------------------------------------------------------------------- rollout


def rollout(
    backend: RolloutBackend,
    prompts: Sequence[Any],
    tokenizer: Any,
    *,
    num_generations: int = 1,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    sampling: SamplingParams | None = None,
    tools: Sequence[Callable[..., Any]] | None = None,
    max_tool_calling_iterations: int | None = None,
    tool_timeout: float | None = 30.0,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> RolloutOutput:
    """Generate completions for ``prompts`` (with tool use when ``tools`` are given).

    Args:
        backend: A :class:`RolloutBackend` (:class:`~honelm.generation.TransformersBackend`,
            a vLLM backend, ...).
        prompts: Plain strings or lists of chat messages.
        tokenizer: The policy's tokenizer (chat template, decoding).
        num_generations: Completions per prompt; row ``i * num_generations + j`` is the
            ``j``-th completion of prompt ``i``.
        max_prompt_length: Prompts longer than this keep their last tokens.
        max_completion_length: Token budget of a whole completion, tool results included;
            defaults to the backend's.
        sampling: Overrides the backend's sampling parameters.
        tools: Tool functions the model may call (conversational prompts only).
        max_tool_calling_iterations: At most this many rounds of tool calls per rollout
            (``None``: until the budget is spent).
        tool_timeout: Seconds each tool call may take before it becomes an error result.
        chat_template_kwargs: Extra arguments of ``apply_chat_template`` (e.g.
            ``enable_thinking``).
    """
    if num_generations < 1:
        raise ValueError(f"rollout: num_generations must be >= 1, got {num_generations}.")
    budget = max_completion_length if max_completion_length is not None else backend.max_completion_length
    if budget < 1:
        raise ValueError(f"rollout: max_completion_length must be >= 1, got {budget}.")
    expanded = [p for p in prompts for _ in range(num_generations)]
    conversational = _prompt_style(expanded)
    if tools and not conversational:
        raise ValueError(
            "rollout: tools need conversational prompts (lists of messages), so that tool results can be "
            "rendered as `tool` messages by the chat template."
        )
    prompt_ids = prepare_prompts(
        expanded, tokenizer, tools=tools, max_prompt_length=max_prompt_length, chat_template_kwargs=chat_template_kwargs
    )
    if tools:
        return _tool_rollout(
            backend,
            expanded,
            prompt_ids,
            tokenizer,
            budget,
            sampling,
            tools,
            max_tool_calling_iterations,
            tool_timeout,
            chat_template_kwargs,
        )
    gen = backend.generate(prompt_ids, max_new_tokens=budget, sampling=sampling)
    texts = tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
    completions: list[Any] = texts
    if conversational:
        completions = [[{"role": "assistant", "content": _bootstrap(p) + t}] for p, t in zip(expanded, texts)]
    return RolloutOutput(
        prompt_ids=prompt_ids,
        completion_ids=gen.completion_ids,
        logps=gen.logps,
        truncated=gen.truncated,
        completions=completions,
        raw_logps=gen.raw_logps,
    )


def _bootstrap(prompt: Sequence[Mapping[str, Any]]) -> str:
    """The content of a final assistant message that the completion continues."""
    last = prompt[-1]
    return str(last.get("content") or "") if last.get("role") == "assistant" else ""


# ------------------------------------------------------------------------ multi-turn tools


@dataclass
class _Trajectory:
    """One multi-turn rollout in progress."""

    prompt_ids: list[int]
    bootstrap: str
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    raw_logps: list[float] = field(default_factory=list)
    tool_mask: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    calls: int = 0
    failures: int = 0
    truncated: bool = False


def _tool_rollout(
    backend: RolloutBackend,
    prompts: list[Any],
    prompt_ids: list[list[int]],
    tokenizer: Any,
    budget: int,
    sampling: SamplingParams | None,
    tools: Sequence[Callable[..., Any]],
    max_rounds: int | None,
    tool_timeout: float | None,
    chat_template_kwargs: Mapping[str, Any] | None,
) -> RolloutOutput:
    table = tools_by_name(tools)
    schemas = [tool_schema(fn) for fn in table.values()]
    trajs = [_Trajectory(ids, _bootstrap(p)) for p, ids in zip(prompts, prompt_ids)]
    active = list(trajs)
    raw_wanted = True
    while active:
        gen = backend.generate(
            [t.prompt_ids + t.ids for t in active],
            max_new_tokens=[budget - len(t.ids) for t in active],
            sampling=sampling,
        )
        raw_wanted = raw_wanted and gen.raw_logps is not None
        pending: list[tuple[_Trajectory, list[ToolCall]]] = []
        for k, (traj, ids) in enumerate(zip(active, gen.completion_ids)):
            traj.ids += ids
            traj.logps += gen.logps[k]
            traj.raw_logps += gen.raw_logps[k] if gen.raw_logps is not None else [0.0] * len(ids)
            traj.tool_mask += [1] * len(ids)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if not traj.messages:
                text = traj.bootstrap + text
            # Parse with special tokens kept, in case a model's tool-call tags are special tokens.
            calls = [] if gen.truncated[k] else parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=False))
            message: dict[str, Any] = {"role": "assistant", "content": strip_tool_calls(text, calls) if calls else text}
            good = [c.as_message_call() for c in calls if c.error is None]
            if good:
                message["tool_calls"] = good
            traj.messages.append(message)
            if gen.truncated[k]:
                traj.truncated = True
            elif calls and (max_rounds is None or traj.rounds < max_rounds) and len(traj.ids) < budget:
                pending.append((traj, calls))
        active = _run_tools(pending, table, schemas, tokenizer, budget, tool_timeout, chat_template_kwargs)
    return RolloutOutput(
        prompt_ids=[t.prompt_ids for t in trajs],
        completion_ids=[t.ids for t in trajs],
        logps=[t.logps for t in trajs],
        truncated=[t.truncated for t in trajs],
        completions=[t.messages for t in trajs],
        raw_logps=[t.raw_logps for t in trajs] if raw_wanted else None,
        tool_mask=[t.tool_mask for t in trajs],
        tool_call_counts=[t.calls for t in trajs],
        tool_failure_counts=[t.failures for t in trajs],
    )


def _run_tools(
    pending: list[tuple[_Trajectory, list[ToolCall]]],
    table: dict[str, Callable[..., Any]],
    schemas: list[dict[str, Any]],
    tokenizer: Any,
    budget: int,
    tool_timeout: float | None,
    chat_template_kwargs: Mapping[str, Any] | None,
) -> list[_Trajectory]:
    """Execute every pending call at once, append the results; return the rollouts to continue."""
    flat = [call for _, calls in pending for call in calls]
    results: list[ToolResult] = execute_tool_calls(flat, table, timeout=tool_timeout) if flat else []
    cursor = 0
    next_active: list[_Trajectory] = []
    for traj, calls in pending:
        mine = results[cursor : cursor + len(calls)]
        cursor += len(calls)
        traj.rounds += 1
        traj.calls += len(calls)
        traj.failures += sum(r.error is not None for r in mine)
        messages = [r.as_message() for r in mine]
        traj.messages.extend(messages)
        suffix = tool_suffix_ids(tokenizer, messages, tools=schemas, chat_template_kwargs=chat_template_kwargs)
        room = budget - len(traj.ids)
        if len(suffix) >= room:  # no room left to answer: keep what fits and stop
            suffix = suffix[:room]
            traj.truncated = True
        traj.ids += suffix
        traj.logps += [0.0] * len(suffix)
        traj.raw_logps += [0.0] * len(suffix)
        traj.tool_mask += [0] * len(suffix)
        if not traj.truncated:
            next_active.append(traj)
    return next_active


# ---------------------------------------------------------------------------- rollout_func


def rollout_from_dict(
    result: Mapping[str, Any],
    tokenizer: Any,
    *,
    prompts: Sequence[Any] | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> RolloutOutput:
    """Check and convert a ``rollout_func`` result (see :data:`RolloutFunc`) to a :class:`RolloutOutput`.

    ``prompts`` (the batch given to the ``rollout_func``) decides whether decoded completions
    are wrapped as assistant messages. ``truncated`` defaults to "does not end with an EOS id"
    (``eos_token_ids`` defaults to the tokenizer's EOS).
    """
    if not isinstance(result, Mapping):
        raise TypeError(f"rollout_func must return a dict, got {type(result).__name__}.")
    if "logps" in result and "logprobs" in result:
        raise ValueError("rollout_func result: give `logprobs` or `logps`, not both.")
    logps_key = "logps" if "logps" in result else "logprobs"
    missing = [k for k in ("prompt_ids", "completion_ids", logps_key) if k not in result]
    if missing:
        raise ValueError(
            f"rollout_func result is missing {missing}: it must return a dict with `prompt_ids`, "
            "`completion_ids` and `logprobs`, one entry per prompt."
        )
    n = len(result["completion_ids"])
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"rollout_func returned {n} completions for {len(prompts)} prompts; return one per prompt.")
    columns: dict[str, list[Any]] = {}
    for key, value in result.items():
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != n:
            size = len(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else "not a list"
            raise ValueError(
                f"rollout_func result[{key!r}] must be a list with one entry per completion ({n}), got {size}."
            )
        columns[key] = list(value)
    completion_ids = [_int_row(row, "completion_ids", i) for i, row in enumerate(columns["completion_ids"])]
    prompt_ids = [_int_row(row, "prompt_ids", i) for i, row in enumerate(columns["prompt_ids"])]
    logps = _aligned(columns[logps_key], completion_ids, logps_key, float)
    tool_mask = _aligned(columns["tool_mask"], completion_ids, "tool_mask", int) if "tool_mask" in columns else None
    eos = set(eos_token_ids) if eos_token_ids is not None else {tokenizer.eos_token_id}
    truncated = (
        [bool(t) for t in columns["truncated"]]
        if "truncated" in columns
        else [not row or row[-1] not in eos for row in completion_ids]
    )
    if "completions" in columns:
        completions = columns["completions"]
    else:
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        conversational = prompts is not None and len(prompts) > 0 and is_conversational_prompt(prompts[0])
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    known = {"prompt_ids", "completion_ids", logps_key, "tool_mask", "truncated", "completions"}
    return RolloutOutput(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        logps=logps,
        truncated=truncated,
        completions=completions,
        tool_mask=tool_mask,
        extra={k: v for k, v in columns.items() if k not in known},
    )


def _int_row(row: Any, key: str, index: int) -> list[int]:
    try:
        return [int(t) for t in row]
    except (TypeError, ValueError):
        raise ValueError(f"rollout_func result[{key!r}][{index}] must be a list of token ids (ints).") from None


def _aligned(rows: list[Any], completion_ids: list[list[int]], key: str, cast: type) -> list[Any]:
    out = []
    for i, (row, ids) in enumerate(zip(rows, completion_ids)):
        values = [cast(v) for v in row]
        if len(values) != len(ids):
            raise ValueError(
                f"rollout_func result[{key!r}][{i}] has {len(values)} values for {len(ids)} completion tokens; "
                "give one per token."
            )
        out.append(values)
    return out
