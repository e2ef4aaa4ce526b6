"""rollout(): prompts, single-turn completions, the multi-turn tool loop and its masks, rollout_func."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from honelm.generation import (
    GenerationOutput,
    SamplingParams,
    TransformersBackend,
    prepare_prompts,
    rollout,
    rollout_from_dict,
    tool_schema,
)
from honelm.testing import tiny_model, tiny_tokenizer


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def divide(a: int, b: int) -> float:
    """Divide a by b.

    Args:
        a: Numerator.
        b: Denominator.
    """
    return a / b


CALL = '<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call><|im_end|>'


def call(name: str, **args: Any) -> str:
    return CALL.format(name=name, args=json.dumps(args))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class ScriptedBackend:
    """A backend whose next assistant turn is ``turns[number of tool results seen so far]``."""

    def __init__(self, tokenizer, turns: list[str], max_completion_length: int = 200, logp: float = -0.25):
        self.tok, self.turns, self.max_completion_length, self.logp = tokenizer, turns, max_completion_length, logp
        self.calls: list[list[int]] = []

    def generate(self, prompt_ids, *, max_new_tokens=None, sampling=None) -> GenerationOutput:
        limits = (
            max_new_tokens
            if isinstance(max_new_tokens, list)
            else [max_new_tokens or self.max_completion_length] * len(prompt_ids)
        )
        self.calls.append(list(limits))
        out = GenerationOutput([], [], [])
        for ids, limit in zip(prompt_ids, limits):
            seen = self.tok.decode(ids).count("<|im_start|>tool")
            text = self.turns[min(seen, len(self.turns) - 1)]
            new = self.tok(text, add_special_tokens=False)["input_ids"][:limit]
            out.completion_ids.append(new)
            out.logps.append([self.logp] * len(new))
            out.truncated.append(new[-1] != self.tok.eos_token_id)
        return out


PROMPT = [{"role": "user", "content": "What is 3 * 4?"}]


# ---------------------------------------------------------------------------------- prompts


def test_prepare_prompts_conversational_standard_and_truncation(tok):
    conv = prepare_prompts([PROMPT], tok, tools=[multiply])[0]
    expected = tok.apply_chat_template(
        PROMPT, tools=[tool_schema(multiply)], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(conv) == expected
    plain = prepare_prompts(["What is 3 * 4?"], tok)[0]
    assert plain == tok("What is 3 * 4?")["input_ids"]
    cut = prepare_prompts([PROMPT], tok, max_prompt_length=5)[0]
    assert cut == prepare_prompts([PROMPT], tok)[0][-5:]


def test_prompt_ending_with_assistant_is_continued(tok):
    prompt = PROMPT + [{"role": "assistant", "content": "Let me think:"}]
    (ids,) = prepare_prompts([prompt], tok)
    assert tok.decode(ids).endswith("<|im_start|>assistant\nLet me think:")


def test_mixed_prompt_formats_name_the_row(tok):
    with pytest.raises(ValueError, match="prompt 1: expected a list of messages"):
        prepare_prompts([PROMPT, "plain"], tok)


# ------------------------------------------------------------------------------ single turn


def test_single_turn_rollout_with_a_tiny_model():
    model, tok = tiny_model("qwen2", seed=0)
    backend = TransformersBackend(model, tok, SamplingParams(temperature=1.0), max_completion_length=6, seed=0)
    prompts = [PROMPT, [{"role": "user", "content": "Hi"}]]
    out = rollout(backend, prompts, tok, num_generations=3)
    assert len(out) == 6
    assert out.prompt_ids[0] == out.prompt_ids[1] == out.prompt_ids[2] != out.prompt_ids[3]
    for ids, completion in zip(out.completion_ids, out.completions):
        assert completion == [{"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}]
    assert out.tool_mask is None and out.tool_call_counts is None
    t = out.to_tensors(tok.pad_token_id)
    assert t["completion_ids"].shape == t["logps"].shape == t["completion_mask"].shape
    assert (t["prompt_mask"][:, -1] == 1).all()  # prompts are left-padded
    chunks = out.split(3)
    assert [len(c) for c in chunks] == [2, 2, 2] and chunks[1].completion_ids == out.completion_ids[2:4]
    with pytest.raises(ValueError, match="steps_per_generation"):
        out.split(4)


def test_standard_prompts_give_text_completions(tok):
    backend = ScriptedBackend(tok, ["7<|im_end|>"])
    out = rollout(backend, ["What is 3 + 4? "], tok)
    assert out.completions == ["7"] and out.truncated == [False]


def test_tools_need_conversational_prompts(tok):
    with pytest.raises(ValueError, match="tools need conversational prompts"):
        rollout(ScriptedBackend(tok, ["x"]), ["plain"], tok, tools=[multiply])


# ------------------------------------------------------------------------------- multi-turn


def _rendered(tok, prompt, messages, tools):
    return tok.apply_chat_template(prompt + messages, tools=[tool_schema(t) for t in tools], tokenize=False)


def test_multi_turn_rollout_matches_the_chat_template_and_masks_tool_results(tok):
    backend = ScriptedBackend(tok, [call("multiply", a=3, b=4), "The answer is 12.<|im_end|>"])
    out = rollout(backend, [PROMPT], tok, tools=[multiply])
    messages = out.completions[0]
    assert messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}],
        },
        {"role": "tool", "name": "multiply", "content": "12"},
        {"role": "assistant", "content": "The answer is 12."},
    ]
    # The token stream is exactly the conversation as the chat template renders it.
    text = tok.decode(out.prompt_ids[0] + out.completion_ids[0])
    assert text + "\n" == _rendered(tok, PROMPT, messages, [multiply])
    # tool_mask is 0 exactly on the tokens the model did not generate.
    ids, mask, logps = out.completion_ids[0], out.tool_mask[0], out.logps[0]
    masked = tok.decode([t for t, m in zip(ids, mask) if m == 0])
    assert masked == "\n<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n"
    generated = tok.decode([t for t, m in zip(ids, mask) if m == 1])
    assert generated == call("multiply", a=3, b=4) + "The answer is 12.<|im_end|>"
    assert all((lp == 0.0) == (m == 0) for lp, m in zip(logps, mask))
    assert out.tool_call_counts == [1] and out.tool_failure_counts == [0] and out.truncated == [False]
    t = out.to_tensors(tok.pad_token_id)
    assert t["tool_mask"][0].tolist() == mask


def test_failed_and_malformed_calls_are_fed_back_and_counted(tok):
    turns = [
        call("divide", a=1, b=0) + "",
        '<tool_call>{"name": "multiply", "arguments": [3]}</tool_call><|im_end|>',
        call("nope"),
        "I give up.<|im_end|>",
    ]
    out = rollout(ScriptedBackend(tok, turns, max_completion_length=400), [PROMPT], tok, tools=[multiply, divide])
    tool_messages = [m for m in out.completions[0] if m["role"] == "tool"]
    assert len(tool_messages) == 3
    assert "ZeroDivisionError" in json.loads(tool_messages[0]["content"])["error"]
    assert "malformed tool call" in json.loads(tool_messages[1]["content"])["error"]
    assert "unknown tool 'nope'" in json.loads(tool_messages[2]["content"])["error"]
    # The malformed call stays visible in the assistant message that made it.
    assert '"arguments": [3]' in out.completions[0][2]["content"]
    assert out.tool_call_counts == [3] and out.tool_failure_counts == [3]
    assert out.completions[0][-1] == {"role": "assistant", "content": "I give up."}
    assert out.truncated == [False]


def test_max_tool_calling_iterations_stops_the_loop(tok):
    backend = ScriptedBackend(tok, [call("multiply", a=1, b=1)])  # would call tools forever
    out = rollout(backend, [PROMPT, PROMPT], tok, tools=[multiply], max_tool_calling_iterations=2)
    assert len(backend.calls) == 3  # initial turn + 2 tool rounds, batched across both rollouts
    assert out.tool_call_counts == [2, 2]
    assert [m["role"] for m in out.completions[0]] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert "tool_calls" in out.completions[0][-1]  # the last call was not run
    assert out.truncated == [False, False]


def test_the_budget_covers_tool_results_and_truncates(tok):
    backend = ScriptedBackend(tok, [call("multiply", a=3, b=4), "The answer is twelve, as computed.<|im_end|>"])
    full = rollout(backend, [PROMPT], tok, tools=[multiply])
    first_turn = full.tool_mask[0].index(0)
    suffix = full.tool_mask[0].count(0)
    budget = first_turn + suffix + 3  # room for the tool result and three more tokens
    backend = ScriptedBackend(tok, backend.turns)
    out = rollout(backend, [PROMPT], tok, tools=[multiply], max_completion_length=budget)
    assert len(out.completion_ids[0]) == budget and out.truncated == [True]
    assert backend.calls == [[budget], [3]]  # the next turn gets what is left
    assert out.completions[0][-1]["content"] == tok.decode(full.completion_ids[0][first_turn + suffix :][:3])
    # A budget that the tool result alone exceeds: the suffix is cut and the rollout ends.
    out = rollout(
        ScriptedBackend(tok, backend.turns), [PROMPT], tok, tools=[multiply], max_completion_length=first_turn + 4
    )
    assert len(out.completion_ids[0]) == first_turn + 4 and out.truncated == [True]
    assert out.tool_mask[0][first_turn:] == [0, 0, 0, 0]


class ForcedLM(torch.nn.Module):
    """A causal LM (for TransformersBackend) that writes ``turns[number of tool results so far]``."""

    def __init__(self, tokenizer, turns: list[str]):
        super().__init__()
        self.tok, self.turns = tokenizer, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns]
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.tool_header = tokenizer("<|im_start|>tool", add_special_tokens=False)["input_ids"]
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def _next(self, context: list[int]) -> int:
        h = len(self.header)
        start = max(i for i in range(len(context) - h + 1) if context[i : i + h] == self.header) + h
        k = sum(context[i : i + len(self.tool_header)] == self.tool_header for i in range(len(context)))
        target = self.turns[min(k, len(self.turns) - 1)]
        done = len(context) - start
        return target[done] if done < len(target) else self.tok.eos_token_id

    def forward(self, input_ids, attention_mask=None, cache=None, **kwargs):
        history = cache if cache is not None else [[] for _ in range(input_ids.shape[0])]
        for row, ids in enumerate(input_ids.tolist()):
            keep = attention_mask[row, -len(ids) :].tolist() if cache is None else [1] * len(ids)
            history[row] += [t for t, m in zip(ids, keep) if m]
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tok))
        for row, context in enumerate(history):
            logits[row, 0, self._next(context)] = 60.0
        out = dict(logits=logits, cache=history)
        return type("Out", (dict,), {"__getattr__": dict.__getitem__})(out)


def test_tool_rollout_through_the_transformers_backend(tok):
    model = ForcedLM(tok, [call("multiply", a=6, b=7), "42<|im_end|>"])
    backend = TransformersBackend(model, tok, SamplingParams(temperature=1.0), max_completion_length=64, seed=0)
    out = rollout(backend, [PROMPT], tok, num_generations=2, tools=[multiply])
    for messages in out.completions:
        assert messages[1] == {"role": "tool", "name": "multiply", "content": "42"}
        assert messages[2] == {"role": "assistant", "content": "42"}
    text = tok.decode(out.prompt_ids[0] + out.completion_ids[0])
    assert text + "\n" == _rendered(tok, PROMPT, out.completions[0], [multiply])
    mask = torch.tensor(out.tool_mask[0])
    logps = torch.tensor(out.logps[0])
    assert (logps[mask == 0] == 0).all() and (logps[mask == 1] > -1e-3).all()  # forced tokens: logp ~ 0


# ---------------------------------------------------------------------------- rollout_func


def test_rollout_from_dict_converts_and_forwards_extra_fields(tok):
    eos = tok.eos_token_id
    result = {
        "prompt_ids": [[1, 2], [3]],
        "completion_ids": [[5, eos], [6, 7]],
        "logprobs": [[-0.1, -0.2], [-0.3, -0.4]],
        "env_reward": [1.0, 0.0],
    }
    out = rollout_from_dict(result, tok, prompts=[PROMPT, PROMPT])
    assert out.logps == [[-0.1, -0.2], [-0.3, -0.4]]
    assert out.truncated == [False, True]
    assert out.extra == {"env_reward": [1.0, 0.0]}
    assert out.completions[0] == [{"role": "assistant", "content": tok.decode([5], skip_special_tokens=True)}]
    assert out.select([1]).extra == {"env_reward": [0.0]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"logprobs": None}, "missing"),
        ({"logprobs": [[-0.1], [-0.3, -0.4]]}, r"result\['logprobs'\]\[0\] has 1 values for 2"),
        ({"env": [1.0]}, r"result\['env'\] must be a list with one entry per completion \(2\)"),
        ({"completion_ids": [[5, "x"], [6, 7]]}, r"result\['completion_ids'\]\[0\] must be a list of token ids"),
    ],
)
def test_rollout_from_dict_errors_name_the_field(tok, change, message):
    result = {"prompt_ids": [[1], [2]], "completion_ids": [[5, 6], [6, 7]], "logprobs": [[-0.1, -0.2], [-0.3, -0.4]]}
    result.update(change)
    result = {k: v for k, v in result.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        rollout_from_dict(result, tok)
