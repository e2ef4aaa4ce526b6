"""Rendering, tokenization, masks and truncation of honelm.data.templates."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from datasets import Dataset, IterableDataset

from honelm.data import (
    ChatTemplateError,
    DatasetFormatError,
    TruncationStats,
    has_generation_markers,
    tokenize_dataset,
    tokenize_row,
    truncate_row,
)
from honelm.testing import CHAT_TEMPLATE, tiny_tokenizer


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def stream(rows: list[dict[str, Any]]) -> IterableDataset:
    def gen():
        yield from rows

    return IterableDataset.from_generator(gen)


def count(ids: list[int], token_id: int) -> int:
    return sum(1 for i in ids if i == token_id)


CHATML_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


# ----------------------------------------------------------------------------- standard


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("text", ["The cat sat.", "The cat sat.<|im_end|>"])
def test_standard_text_gets_one_eos_and_at_most_one_bos(add_bos, text):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    ids = tokenize_row({"text": text}, tokenizer)["input_ids"]
    expected = ("<|bos|>" if add_bos else "") + "The cat sat.<|im_end|>"
    assert tokenizer.decode(ids) == expected
    assert count(ids, tokenizer.eos_token_id) == 1
    assert count(ids, tokenizer.bos_token_id) == int(add_bos)


def test_text_that_already_starts_with_bos_keeps_one(tok_bos):
    ids = tokenize_row({"text": "<|bos|>Hello there"}, tok_bos)["input_ids"]
    assert tok_bos.decode(ids) == "<|bos|>Hello there<|im_end|>"
    assert count(ids, tok_bos.bos_token_id) == 1


@pytest.mark.parametrize("text", ["Base model text", "Base model text<|endoftext|>"])
def test_eos_token_override(tok, text):
    ids = tokenize_row({"text": text}, tok, eos_token="<|endoftext|>")["input_ids"]
    assert tok.decode(ids) == "Base model text<|endoftext|>"
    assert count(ids, tok.eos_token_id) == 0
    row = tokenize_row({"prompt": "Q:", "completion": " A"}, tok, eos_token="<|endoftext|>")
    assert tok.decode(row["input_ids"]) == "Q: A<|endoftext|>"


def test_eos_token_override_must_be_one_token(tok):
    with pytest.raises(ValueError, match="is not a single token"):
        tokenize_row({"text": "x"}, tok, eos_token="END OF TEXT")


@pytest.mark.parametrize("add_bos", [False, True])
def test_standard_prompt_completion_mask(add_bos, masked_text):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    row = tokenize_row({"prompt": "The sky is", "completion": " blue"}, tokenizer)
    ids, mask = row["input_ids"], row["completion_mask"]
    assert masked_text(tokenizer, ids, mask) == " blue<|im_end|>"
    assert masked_text(tokenizer, ids, [1 - m for m in mask]) == ("<|bos|>" if add_bos else "") + "The sky is"
    assert mask == sorted(mask)  # prompt first, then completion
    assert count(ids, tokenizer.bos_token_id) == int(add_bos) and (not add_bos or ids[0] == tokenizer.bos_token_id)


def test_completion_already_ending_with_eos_is_not_doubled(tok):
    row = tokenize_row({"prompt": "Q", "completion": " A<|im_end|>"}, tok)
    assert count(row["input_ids"], tok.eos_token_id) == 1 and row["input_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("add_bos", [False, True])
def test_standard_preference(add_bos):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    row = tokenize_row({"prompt": "The sky is", "chosen": " blue", "rejected": " green."}, tokenizer)
    decoded = {k: tokenizer.decode(v) for k, v in row.items()}
    bos = "<|bos|>" if add_bos else ""
    assert decoded == {
        "prompt_input_ids": bos + "The sky is",
        "chosen_input_ids": " blue<|im_end|>",
        "rejected_input_ids": " green.<|im_end|>",
    }


def test_standard_implicit_preference(tok):
    row = tokenize_row({"chosen": "The sky is blue", "rejected": "The sky is green"}, tok)
    assert [tok.decode(row[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")] == [
        "The sky is",
        " blue<|im_end|>",
        " green<|im_end|>",
    ]


def test_standard_unpaired_and_prompt_only(tok_bos):
    row = tokenize_row({"prompt": "Is it?", "completion": " Yes", "label": False}, tok_bos)
    assert row["label"] is False
    assert tok_bos.decode(row["prompt_input_ids"]) == "<|bos|>Is it?"
    assert tok_bos.decode(row["completion_input_ids"]) == " Yes<|im_end|>"
    row = tokenize_row({"prompt": "Once upon"}, tok_bos)
    assert list(row) == ["prompt_input_ids"] and tok_bos.decode(row["prompt_input_ids"]) == "<|bos|>Once upon"


# ----------------------------------------------------------------------------- conversational


@pytest.mark.parametrize("add_bos", [False, True])
def test_conversational_lm_assistant_masks(add_bos, masked_text):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    messages = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello!"),
        user("Bye"),
        assistant("See you."),
    ]
    row = tokenize_row({"messages": messages}, tokenizer, assistant_only_loss=True)
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert masked_text(tokenizer, ids, mask) == "Hello!<|im_end|>See you.<|im_end|>"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert count(ids, tokenizer.bos_token_id) == int(add_bos)
    assert "assistant_masks" not in tokenize_row({"messages": messages}, tokenizer)


def test_conversational_prompt_completion(tok, masked_text):
    row = {"prompt": [user("2+2?")], "completion": [assistant("4")]}
    out = tokenize_row(row, tok)
    ids, mask = out["input_ids"], out["completion_mask"]
    assert masked_text(tok, ids, mask) == "4<|im_end|>"
    assert masked_text(tok, ids, [1 - m for m in mask]) == CHATML_PROMPT.format("2+2?")
    assert ids[-1] == tok.eos_token_id  # the newline the template puts after the turn is not trained on
    out = tokenize_row(row, tok, assistant_only_loss=True)
    assert masked_text(tok, out["input_ids"], out["assistant_masks"]) == "4<|im_end|>"


def test_conversational_prompt_completion_with_bos(tok_bos, masked_text):
    out = tokenize_row({"prompt": [user("q")], "completion": [assistant("a")]}, tok_bos)
    assert count(out["input_ids"], tok_bos.bos_token_id) == 1 and out["input_ids"][0] == tok_bos.bos_token_id
    assert masked_text(tok_bos, out["input_ids"], out["completion_mask"]) == "a<|im_end|>"


@pytest.mark.parametrize("tools", [[WEATHER_TOOL], json.dumps([WEATHER_TOOL])])
def test_tools_reach_the_template_and_tool_calls_are_trained(tok, masked_text, tools):
    row = {
        "prompt": [user("Weather in Paris?")],
        "completion": [
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"},
            assistant("It is sunny."),
        ],
        "tools": tools,
    }
    out = tokenize_row(row, tok)
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text
    assert masked_text(tok, out["input_ids"], out["completion_mask"]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\nIt is sunny.<|im_end|>"
    )
    masks = tokenize_row({"messages": row["prompt"] + row["completion"], "tools": tools}, tok, assistant_only_loss=True)
    assert masked_text(tok, masks["input_ids"], masks["assistant_masks"]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "It is sunny.<|im_end|>"
    )


def test_arrow_null_filling_does_not_reach_the_template(tok):
    """Arrow gives every row the union of struct keys, filled with None; those are dropped."""
    other_tool = {
        "type": "function",
        "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}},
    }
    rows = [
        {"messages": [user("w?"), {"role": "assistant", "content": "", "tool_calls": [CALL]}], "tools": [WEATHER_TOOL]},
        {"messages": [user("1+1?"), assistant("2")], "tools": [other_tool]},
    ]
    data, _ = tokenize_dataset(Dataset.from_list(rows), tok)
    second = tok.decode(data[1]["input_ids"])
    assert json.dumps(other_tool) in second and "null" not in second and "None" not in second


@pytest.mark.parametrize("add_bos", [False, True])
def test_conversational_preference(add_bos):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    row = {"prompt": [user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]}
    out = {k: tokenizer.decode(v) for k, v in tokenize_row(row, tokenizer).items()}
    assert out == {
        "prompt_input_ids": ("<|bos|>" if add_bos else "") + CHATML_PROMPT.format("Sky?"),
        "chosen_input_ids": "Blue.<|im_end|>",
        "rejected_input_ids": "Green.<|im_end|>",
    }


def test_conversational_implicit_preference_and_unpaired(tok):
    row = {"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?"), assistant("Green.")]}
    out = tokenize_row(row, tok)
    assert tok.decode(out["prompt_input_ids"]) == CHATML_PROMPT.format("Sky?")
    assert tok.decode(out["rejected_input_ids"]) == "Green.<|im_end|>"
    unpaired = tokenize_row({"prompt": [user("Sky?")], "completion": [assistant("Blue.")], "label": True}, tok)
    assert tok.decode(unpaired["completion_input_ids"]) == "Blue.<|im_end|>" and unpaired["label"] is True


def test_conversational_prompt_only(tok):
    out = tokenize_row({"prompt": [user("Sky?")]}, tok)
    assert tok.decode(out["prompt_input_ids"]) == CHATML_PROMPT.format("Sky?")
    prefill = tokenize_row({"prompt": [user("Sky?"), assistant("It is")]}, tok)  # the model continues the reply
    assert tok.decode(prefill["prompt_input_ids"]) == CHATML_PROMPT.format("Sky?") + "It is"


def test_template_without_generation_markers(tok, masked_text):
    plain = CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tokenizer = tiny_tokenizer(chat_template=plain)
    assert has_generation_markers(tok) and not has_generation_markers(tokenizer)
    row = {"messages": [user("Hi"), assistant("Hello")]}
    with pytest.raises(ChatTemplateError, match=r"no such markers"):
        tokenize_row(row, tokenizer, assistant_only_loss=True)
    assert tokenizer.decode(tokenize_row(row, tokenizer)["input_ids"]).endswith("Hello<|im_end|>\n")
    # prompt-completion data needs no markers: the mask comes from the prompt render
    out = tokenize_row({"prompt": [user("Hi")], "completion": [assistant("Hello")]}, tokenizer)
    assert masked_text(tokenizer, out["input_ids"], out["completion_mask"]) == "Hello<|im_end|>"


def test_assistant_masks_need_conversational_lm_or_prompt_completion(tok):
    with pytest.raises(ValueError, match="assistant_only_loss=True needs conversational"):
        tokenize_row({"text": "hi"}, tok, assistant_only_loss=True)
    with pytest.raises(ValueError, match="this dataset is conversational preference"):
        tokenize_row(
            {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            tok,
            assistant_only_loss=True,
        )


def test_no_chat_template(tok_plain):
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tokenize_row({"messages": [user("Hi"), assistant("Hello")]}, tok_plain)
    assert tok_plain.decode(tokenize_row({"text": "Hi"}, tok_plain)["input_ids"]) == "Hi<|im_end|>"


def test_template_that_is_not_prefix_stable():
    unstable = CHAT_TEMPLATE.replace(
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}",
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}",
    )
    tokenizer = tiny_tokenizer(chat_template=unstable)
    rows = [{"prompt": [user("q")], "completion": [assistant("a")]}] * 3
    with pytest.raises(ChatTemplateError) as info:
        tokenize_dataset(Dataset.from_list(rows), tokenizer)
    message = str(info.value)
    assert info.value.row == 0 and message.startswith("Row 0, column 'completion'")
    assert "not prefix-stable" in message and "<think>" in message


# ----------------------------------------------------------------------------- tokenized input


def test_tokenized_rows_pass_through_and_are_truncated_with_their_masks():
    data = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "extra": "x"}])
    out, stats = tokenize_dataset(data, tiny_tokenizer(), max_length=3, truncation_mode="keep_end")
    assert out.column_names == ["input_ids", "completion_mask"]
    assert out[0] == {"input_ids": [6, 7, 8], "completion_mask": [0, 1, 1]}
    assert (stats.num_truncated, stats.tokens_dropped) == (1, 1)
    pairs = Dataset.from_list([{"prompt_input_ids": [1, 2], "completion_input_ids": [3]}])
    out, _ = tokenize_dataset(pairs, tiny_tokenizer())
    assert out[0] == {"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]}


# ----------------------------------------------------------------------------- truncation


def test_truncate_input_ids_rows_keep_start_and_keep_end():
    row = {"input_ids": [1, 2, 3, 4, 5], "completion_mask": [0, 0, 1, 1, 1], "assistant_masks": [0, 0, 0, 1, 1]}
    start, dropped = truncate_row(row, 3)
    assert start == {"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1], "assistant_masks": [0, 0, 0]}
    assert dropped == 2
    end, dropped = truncate_row(row, 3, "keep_end")
    assert end == {"input_ids": [3, 4, 5], "completion_mask": [1, 1, 1], "assistant_masks": [0, 1, 1]}
    assert dropped == 2
    assert truncate_row(row, 5) == (row, 0) and truncate_row(row, None) == (row, 0)


def test_truncate_preference_rows():
    row = {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5, 6, 7], "rejected_input_ids": [8, 9]}
    out, dropped = truncate_row(row, 5)
    assert out == {"prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [8, 9]}
    assert dropped == 2
    # keep_end: the shared prompt loses its first 2 tokens (what the longer completion needs)
    out, dropped = truncate_row(row, 5, "keep_end")
    assert out == {"prompt_input_ids": [3], "chosen_input_ids": [4, 5, 6, 7], "rejected_input_ids": [8, 9]}
    assert dropped == 2
    # a completion longer than max_length: prompt gone, completion loses its beginning
    out, dropped = truncate_row(
        {"prompt_input_ids": [1, 2], "completion_input_ids": [3, 4, 5, 6], "label": True}, 3, "keep_end"
    )
    assert out == {"prompt_input_ids": [], "completion_input_ids": [4, 5, 6], "label": True} and dropped == 3
    out, dropped = truncate_row({"prompt_input_ids": [1, 2, 3, 4]}, 2, "keep_end")
    assert out == {"prompt_input_ids": [3, 4]} and dropped == 2
    out, dropped = truncate_row({"prompt_input_ids": [1, 2, 3], "completion_input_ids": [4]}, 2)
    assert out == {"prompt_input_ids": [1, 2], "completion_input_ids": []} and dropped == 2


def test_truncation_arguments_are_checked():
    with pytest.raises(ValueError, match="truncation_mode='left'"):
        truncate_row({"input_ids": [1]}, 4, "left")
    with pytest.raises(ValueError, match="max_length=0"):
        tokenize_dataset(Dataset.from_dict({"text": ["a"]}), tiny_tokenizer(), max_length=0)


def test_truncation_stats_summary():
    stats = TruncationStats(max_length=512)
    for dropped in [0] * 963 + [310] + [106] * 30 + [105] * 6:  # 1,000 rows, 37 truncated, 4,120 tokens
        stats.add(dropped)
    assert str(stats) == (
        "37 of 1,000 rows (3.7%) were truncated at max_length=512, losing 4,120 tokens (max 310 in one row)."
    )
    assert TruncationStats(max_length=8, num_rows=3).summary() == "No row was truncated at max_length=8 (3 rows)."
    assert "Truncation is off" in TruncationStats(max_length=None, num_rows=3).summary()


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_tokenize_dataset_truncation_and_stats(tok, mode, masked_text):
    rows = [{"prompt": "Q" * k, "completion": " answer"} for k in (1, 6, 12, 30)]
    full, none = tokenize_dataset(Dataset.from_list(rows), tok)
    lengths = [len(r["input_ids"]) for r in full]
    limit = sorted(lengths)[1]
    out, stats = tokenize_dataset(Dataset.from_list(rows), tok, max_length=limit, truncation_mode=mode)
    dropped = [max(n - limit, 0) for n in lengths]
    assert none.num_truncated == 0 and none.num_rows == 4
    assert (stats.num_rows, stats.num_truncated) == (4, sum(d > 0 for d in dropped))
    assert (stats.tokens_dropped, stats.max_tokens_dropped) == (sum(dropped), max(dropped))
    for before, after in zip(full, out):
        keep = slice(0, limit) if mode == "keep_start" else slice(-limit, None)
        assert after["input_ids"] == before["input_ids"][keep]
        assert after["completion_mask"] == before["completion_mask"][keep]
    last = out[-1]
    assert masked_text(tok, last["input_ids"], last["completion_mask"]) == (
        "" if mode == "keep_start" else " answer<|im_end|>"
    )


# ----------------------------------------------------------------------------- datasets


def test_tokenize_dataset_removes_columns_and_validates_before_tokenizing(tok):
    rows = [{"prompt": [user("q")], "completion": [assistant("a")], "id": i} for i in range(5)]
    out, _ = tokenize_dataset(Dataset.from_list(rows), tok)
    assert out.column_names == ["input_ids", "completion_mask"] and len(out) == 5
    bad = rows + [{"prompt": [user("q")], "completion": [{"role": "bot", "content": "a"}], "id": 5}]
    too_early = mock.patch.object(type(tok), "apply_chat_template", side_effect=AssertionError("tokenized too early"))
    with too_early, pytest.raises(DatasetFormatError, match=r"Row 5, column 'completion'"):
        tokenize_dataset(Dataset.from_list(bad), tok)


def test_tokenize_dataset_expected_kinds(tok):
    with pytest.raises(DatasetFormatError, match="fit no preference format"):
        tokenize_dataset(Dataset.from_dict({"text": ["a"]}), tok, expected_kinds=("preference",))


def test_tokenize_dataset_matches_row_by_row(tok):
    rows = [{"prompt": f"Question {i}:", "chosen": f" yes {i}", "rejected": " no"} for i in range(7)]
    out, _ = tokenize_dataset(Dataset.from_list(rows), tok, batch_size=3)
    assert [dict(r) for r in out] == [tokenize_row(r, tok) for r in rows]


def test_tokenize_iterable_dataset_lazily(tok):
    rows = [{"messages": [user(f"q{i}"), assistant("a" * (i + 1))]} for i in range(4)]
    rows.append({"messages": [user("q"), {"role": "bot", "content": "x"}]})
    out, stats = tokenize_dataset(stream(rows), tok, max_length=16, assistant_only_loss=True, batch_size=2)
    assert isinstance(out, IterableDataset) and stats.num_rows == 0 and not stats.complete
    iterator = iter(out)
    first = [next(iterator) for _ in range(4)]
    assert all(set(r) == {"input_ids", "assistant_masks"} and len(r["input_ids"]) <= 16 for r in first)
    full = [tokenize_row(r, tok)["input_ids"] for r in rows[:4]]
    assert first[0]["input_ids"] == full[0][:16]
    assert stats.num_rows == 4
    assert stats.tokens_dropped == sum(max(len(ids) - 16, 0) for ids in full)
    assert "rows seen so far" in stats.summary()
    with pytest.raises(DatasetFormatError, match=r"Row 4, column 'messages'"):
        next(iterator)


def test_tokenize_iterable_with_features(tok):
    data = Dataset.from_dict({"text": ["a b", "c"]}).to_iterable_dataset()
    out, _ = tokenize_dataset(data, tok)
    assert [tok.decode(r["input_ids"]) for r in out] == ["a b<|im_end|>", "c<|im_end|>"]


def test_formatting_func(tok, masked_text):
    data = Dataset.from_dict({"question": ["2+2?", "3+3?"], "answer": ["4", "6"]})
    out, _ = tokenize_dataset(data, tok, formatting_func=lambda r: f"Q: {r['question']} A: {r['answer']}")
    assert [tok.decode(r["input_ids"]) for r in out] == ["Q: 2+2? A: 4<|im_end|>", "Q: 3+3? A: 6<|im_end|>"]

    def to_messages(row):
        return [user(row["question"]), assistant(row["answer"])]

    for source in (data, data.to_iterable_dataset()):
        out, _ = tokenize_dataset(source, tok, formatting_func=to_messages, assistant_only_loss=True)
        first = next(iter(out))
        assert masked_text(tok, first["input_ids"], first["assistant_masks"]) == "4<|im_end|>"


def test_formatting_func_must_be_consistent(tok):
    data = Dataset.from_dict({"q": ["a", "b", "c"]})
    with pytest.raises(DatasetFormatError, match=r"Row 2, column 'text': formatting_func returned a list"):
        tokenize_dataset(data, tok, formatting_func=lambda r: "x" if r["q"] != "c" else [user("y")])
    with pytest.raises(DatasetFormatError, match=r"Row 0: formatting_func returned a int"):
        tokenize_dataset(data, tok, formatting_func=lambda r: 3)


def test_tokenize_dataset_with_worker_processes(tok):
    rows = [{"text": "word " * (i % 7 + 1)} for i in range(40)]
    out, stats = tokenize_dataset(Dataset.from_list(rows), tok, max_length=4, num_proc=2, batch_size=8)
    single, single_stats = tokenize_dataset(Dataset.from_list(rows), tok, max_length=4)
    assert out["input_ids"][:] == single["input_ids"][:]
    assert stats == single_stats and stats.num_truncated > 0


def test_stream_with_extra_columns_and_empty_inputs(tok):
    out, _ = tokenize_dataset(stream([{"text": "a", "id": 1}, {"text": "b", "id": 2}]), tok)
    assert [set(r) for r in out] == [{"input_ids"}, {"input_ids"}]
    with pytest.raises(DatasetFormatError, match="no rows"):
        tokenize_dataset(Dataset.from_dict({"q": []}), tok, formatting_func=lambda r: r["q"])


ALL_TEXT_FORMATS = [
    {"text": "The cat sat."},
    {"messages": [user("Hi"), assistant("Hello")]},
    {"prompt": "Once upon"},
    {"prompt": [user("Tell a story")]},
    {"prompt": "2+2=", "completion": " 4"},
    {"prompt": [user("2+2?")], "completion": [assistant("4")]},
    {"prompt": "Sky is", "chosen": " blue", "rejected": " green"},
    {"prompt": [user("Sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    {"chosen": "Sky is blue", "rejected": "Sky is green"},
    {"chosen": [user("Sky?"), assistant("blue")], "rejected": [user("Sky?"), assistant("green")]},
    {"prompt": "Sky is", "completion": " blue", "label": True},
    {"prompt": [user("Sky?")], "completion": [assistant("blue")], "label": False},
    {
        "prompt": [user("Weather?")],
        "completion": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
        "tools": [WEATHER_TOOL],
    },
]


@pytest.mark.parametrize("row", ALL_TEXT_FORMATS)
def test_every_format_tokenizes_the_same_row_by_row_in_a_dataset_and_in_a_stream(tok_bos, row):
    expected = tokenize_row(row, tok_bos)
    in_memory, _ = tokenize_dataset(Dataset.from_list([row, row]), tok_bos)
    streamed, _ = tokenize_dataset(stream([row, row]), tok_bos)
    assert [dict(r) for r in in_memory] == [expected, expected]
    assert list(streamed) == [expected, expected]
    ids = [i for column, v in expected.items() if column.endswith("input_ids") for i in v]
    assert count(ids, tok_bos.bos_token_id) == 1  # exactly one BOS, at the start of the (prompt) sequence


def test_template_that_writes_bos_itself_does_not_double_it(tok_bos):
    tokenizer = tiny_tokenizer(add_bos=True, chat_template="{{- bos_token }}" + CHAT_TEMPLATE)
    assert tokenizer.apply_chat_template([user("q")], tokenize=False).startswith("<|bos|><|bos|>")
    out = tokenize_row({"prompt": [user("q")], "completion": [assistant("a")]}, tokenizer, assistant_only_loss=True)
    assert count(out["input_ids"], tokenizer.bos_token_id) == 1 and out["input_ids"][0] == tokenizer.bos_token_id
    assert len(out["assistant_masks"]) == len(out["input_ids"])
    assert out == tokenize_row(
        {"prompt": [user("q")], "completion": [assistant("a")]}, tok_bos, assistant_only_loss=True
    )


def test_dataset_with_a_tensor_format_is_read_as_python(tok):
    data = Dataset.from_list([{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}]).with_format("torch")
    out, _ = tokenize_dataset(data, tok, max_length=2)
    assert out.with_format(None)[0] == {"input_ids": [5, 6], "completion_mask": [0, 1]}
