"""Format detection, row validation and the preference transforms of honelm.data.formats."""

from __future__ import annotations

import json
from typing import Any

import pytest
from datasets import Dataset, IterableDataset

from honelm.data import (
    DatasetFormat,
    DatasetFormatError,
    detect_format,
    extract_prompt,
    is_conversational,
    unpair_preference,
    unpair_preference_dataset,
    validate_dataset,
    validate_row,
    validate_stream,
)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def stream(rows: list[dict[str, Any]]) -> IterableDataset:
    """An IterableDataset without features, as from a generator (types only known per row)."""

    def gen():
        yield from rows

    return IterableDataset.from_generator(gen)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# (row, kind, conversational, implicit, tokenized, columns)
FORMAT_CASES = [
    ({"text": "Hello."}, "language_modeling", False, False, False, ("text",)),
    ({"messages": [user("Hi"), assistant("Hello")]}, "language_modeling", True, False, False, ("messages",)),
    ({"prompt": "Say hi"}, "prompt_only", False, False, False, ("prompt",)),
    ({"prompt": [user("Say hi")]}, "prompt_only", True, False, False, ("prompt",)),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", False, False, False, ("prompt", "completion")),
    (
        {"prompt": [user("2+2?")], "completion": [assistant("4")]},
        "prompt_completion",
        True,
        False,
        False,
        ("prompt", "completion"),
    ),
    (
        {"prompt": "Sky is", "chosen": " blue", "rejected": " green"},
        "preference",
        False,
        False,
        False,
        ("prompt", "chosen", "rejected"),
    ),
    (
        {"prompt": [user("Sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
        "preference",
        True,
        False,
        False,
        ("prompt", "chosen", "rejected"),
    ),
    ({"chosen": "Sky is blue", "rejected": "Sky is green"}, "preference", False, True, False, ("chosen", "rejected")),
    (
        {"chosen": [user("Sky?"), assistant("blue")], "rejected": [user("Sky?"), assistant("green")]},
        "preference",
        True,
        True,
        False,
        ("chosen", "rejected"),
    ),
    (
        {"prompt": "Sky is", "completion": " blue", "label": True},
        "unpaired_preference",
        False,
        False,
        False,
        ("prompt", "completion", "label"),
    ),
    (
        {"prompt": [user("Sky?")], "completion": [assistant("blue")], "label": False},
        "unpaired_preference",
        True,
        False,
        False,
        ("prompt", "completion", "label"),
    ),
    (
        {"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]},
        "language_modeling",
        False,
        False,
        True,
        ("input_ids", "completion_mask"),
    ),
    (
        {"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]},
        "preference",
        False,
        False,
        True,
        ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
    ),
    (
        {"prompt_input_ids": [1], "completion_input_ids": [2], "label": True},
        "unpaired_preference",
        False,
        False,
        True,
        ("prompt_input_ids", "completion_input_ids", "label"),
    ),
    (
        {"prompt_input_ids": [1], "completion_input_ids": [2]},
        "prompt_completion",
        False,
        False,
        True,
        ("prompt_input_ids", "completion_input_ids"),
    ),
    ({"prompt_input_ids": [1, 2]}, "prompt_only", False, False, True, ("prompt_input_ids",)),
]


@pytest.mark.parametrize("source", ["row", "dataset", "stream"])
@pytest.mark.parametrize(("row", "kind", "conversational", "implicit", "tokenized", "columns"), FORMAT_CASES)
def test_detect_every_format(source, row, kind, conversational, implicit, tokenized, columns):
    data = {"row": row, "dataset": Dataset.from_list([row, row]), "stream": stream([row, row])}[source]
    fmt = detect_format(data)
    assert fmt == DatasetFormat(kind, conversational, implicit, tokenized, columns)
    if source != "row":  # every row of these is valid
        assert validate_dataset(data) == fmt


def test_tools_column_is_read_for_conversational_data():
    row = {
        "prompt": [user("Weather in Paris?")],
        "completion": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
        "tools": [WEATHER_TOOL],
        "source": "web",  # extra columns are ignored
    }
    fmt = validate_dataset(Dataset.from_list([row]))
    assert fmt.columns == ("prompt", "completion", "tools") and fmt.conversational
    assert fmt.text_columns == ("prompt", "completion")
    validate_row({**row, "tools": json.dumps([WEATHER_TOOL])}, 0, fmt)  # a JSON string works too


def test_tool_conversation_with_tool_role_validates():
    messages = [
        user("Weather?"),
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
        assistant("It is sunny."),
    ]
    assert validate_dataset(Dataset.from_list([{"messages": messages, "tools": [WEATHER_TOOL]}])).conversational


def test_dataset_text_field_names_the_text_column():
    fmt = detect_format(Dataset.from_dict({"content": ["a"]}), dataset_text_field="content")
    assert (fmt.kind, fmt.columns) == ("language_modeling", ("content",))


def test_expected_kinds_choose_between_fitting_formats():
    data = Dataset.from_dict({"prompt": ["a"], "text": ["b"]})
    assert detect_format(data).kind == "language_modeling"
    assert detect_format(data, expected_kinds=("prompt_only",)).kind == "prompt_only"


def test_expected_kinds_reject_other_formats_and_say_what_the_data_is():
    data = Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    with pytest.raises(DatasetFormatError) as info:
        detect_format(data, expected_kinds=("preference",))
    message = str(info.value)
    assert "fit no preference format" in message
    assert "They fit prompt-only or prompt-completion data" in message
    assert "'prompt' + 'chosen' + 'rejected'" in message
    assert "missing ['chosen', 'rejected']" in message
    with pytest.raises(ValueError, match="expected_kinds"):
        detect_format(data, expected_kinds=("sft",))


def test_style_comes_from_features_or_first_row():
    conv = {"prompt": [user("q")], "completion": [assistant("a")]}
    assert detect_format(Dataset.from_list([conv])).conversational  # from the features
    assert detect_format(Dataset.from_list([conv]).to_iterable_dataset()).conversational  # features kept
    assert detect_format(stream([conv])).conversational  # no features: first row
    assert not detect_format(stream([{"prompt": "q", "completion": "a"}])).conversational


def test_is_conversational():
    assert is_conversational([user("hi")])
    assert not is_conversational("hi")
    assert not is_conversational([])
    assert not is_conversational(["hi"])
    assert not is_conversational(None)


# ----------------------------------------------------------------------------- errors


def raises_for(data: Any, **kwargs: Any) -> DatasetFormatError:
    with pytest.raises(DatasetFormatError) as info:
        if isinstance(data, IterableDataset):
            list(validate_stream(data, **kwargs))
        else:
            validate_dataset(data, **kwargs)
    return info.value


def assert_names(error: DatasetFormatError, row: int | None, column: str | None) -> str:
    message = str(error)
    assert error.row == row and error.column == column
    if row is not None:
        assert f"Row {row}," in message
    if column is not None:
        assert repr(column) in message
    assert "Expected" in message and "Fix:" in message
    return message


def test_missing_column_lists_columns_and_formats():
    error = raises_for(Dataset.from_dict({"question": ["q"], "answer": ["a"]}))
    message = str(error)
    assert error.row is None
    assert "['question', 'answer']" in message
    for needed in (
        "'prompt' + 'completion'",
        "'prompt' + 'chosen' + 'rejected'",
        "'messages'",
        "'text'",
        "'prompt' + 'completion' + 'label'",
        "'input_ids'",
    ):
        assert needed in message
    assert "rename_column" in message and "formatting_func" in message


def test_missing_column_near_miss_names_the_missing_column():
    error = raises_for(Dataset.from_dict({"chosen": ["a"], "other": ["b"]}))
    assert error.column == "rejected"
    assert "you have ['chosen'], missing ['rejected']" in str(error)
    assert "'chosen' -> preference" in str(error)


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ({"text": ""}, "text"),
        ({"prompt": "q", "completion": ""}, "completion"),
        ({"prompt": "q", "completion": "   "}, "completion"),
        ({"prompt": "", "completion": "a"}, "prompt"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen"),
        ({"prompt": "q", "chosen": "a", "rejected": " \n"}, "rejected"),
    ],
)
def test_empty_text(row, column):
    good = {k: "x" for k in row}
    good["rejected" if "rejected" in row else column] = "y"
    message = assert_names(raises_for(Dataset.from_list([good, good, row])), 2, column)
    assert "is empty" in message and "non-empty string" in message and "filter" in message


def test_empty_assistant_message():
    rows = [
        {"prompt": [user("q")], "completion": [assistant("a")]},
        {"prompt": [user("q")], "completion": [assistant("")]},
    ]
    message = assert_names(raises_for(Dataset.from_list(rows)), 1, "completion")
    assert "message 0 (assistant) is empty" in message


def test_wrong_role_lists_allowed_roles():
    rows = [{"messages": [user("hi"), assistant("yo")]}, {"messages": [user("hi"), {"role": "bot", "content": "yo"}]}]
    message = assert_names(raises_for(Dataset.from_list(rows)), 1, "messages")
    assert "message 1 has role 'bot'" in message
    assert "['system', 'developer', 'user', 'assistant', 'tool']" in message
    assert "'bot' is probably 'assistant'" in message


@pytest.mark.parametrize("content", [7, None, ["a", "b"]])
def test_non_string_content(content):
    rows = [
        {"messages": [user("hi"), assistant("yo")]},
        {"messages": [user("hi"), {"role": "assistant", "content": content}]},
    ]
    message = assert_names(raises_for(stream(rows)), 1, "messages")
    assert f"message 1 (assistant) has content {content!r} of type {type(content).__name__}" in message
    assert "only an assistant message with 'tool_calls' may have no content" in message


def test_none_content_is_fine_with_tool_calls_only_on_assistant():
    fmt = detect_format({"messages": []})
    validate_row({"messages": [user("w?"), {"role": "assistant", "content": None, "tool_calls": [CALL]}]}, 0, fmt)
    with pytest.raises(DatasetFormatError, match="has 'tool_calls' but role 'user'"):
        validate_row({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, 0, fmt)
    with pytest.raises(DatasetFormatError, match="tool call without a function name"):
        validate_row({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]}, 0, fmt)


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"content": "hi"}, "message 0 has no 'role' (keys: ['content'])"),
        ({"role": None, "content": "hi"}, "message 0 has no 'role'"),
        ({"role": "user"}, "message 0 (user) has no 'content' (keys: ['role'])"),
        ({"from": "human", "value": "hi"}, "ShareGPT"),
        ("hi", "message 0 is a str"),
    ],
)
def test_message_missing_role_or_content(message, problem):
    rows = [{"prompt": [user("q")]}, {"prompt": [user("q")]}, {"prompt": [user("q")]}, {"prompt": [message]}]
    error = raises_for(stream(rows))
    assert problem in assert_names(error, 3, "prompt")


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": [user("q")], "chosen": [assistant("same")], "rejected": [assistant("same")]},
        {"chosen": "q same", "rejected": "q same"},
    ],
)
def test_identical_chosen_and_rejected(row):
    good = {**row, "rejected": row["rejected"] + "!" if isinstance(row["rejected"], str) else [assistant("other")]}
    message = assert_names(raises_for(stream([good, row])), 1, "rejected")
    assert "chosen and rejected are identical" in message


def test_identical_tokenized_pair():
    row = {"prompt_input_ids": [1], "chosen_input_ids": [2, 3], "rejected_input_ids": [2, 3]}
    error = raises_for(Dataset.from_list([row]))
    assert "chosen and rejected are identical" in assert_names(error, 0, "rejected_input_ids")


def test_mixed_forms_between_columns():
    rows = [{"prompt": "q", "completion": [assistant("a")]}]
    message = assert_names(raises_for(Dataset.from_list(rows)), 0, "completion")
    assert "found a list of messages (conversational), but this dataset is standard" in message
    assert "decided from its first text column 'prompt'" in message


def test_mixed_forms_between_rows_of_a_stream():
    rows = [{"text": "plain"}, {"text": "plain too"}, {"text": [user("hi")]}]
    data = validate_stream(stream(rows))  # nothing is read until iterated
    iterator = iter(data)
    assert next(iterator)["text"] == "plain"
    with pytest.raises(DatasetFormatError) as info:
        list(iterator)
    assert "found a list of messages" in assert_names(info.value, 2, "text")


def test_mixed_forms_other_way_round():
    rows = [{"messages": [user("hi"), assistant("yo")]}, {"messages": "hi"}]
    message = assert_names(raises_for(stream(rows)), 1, "messages")
    assert "found a plain string (standard), but this dataset is conversational" in message


def test_wrong_type_and_missing_value():
    assert "found a int (3)" in assert_names(raises_for(stream([{"text": "a"}, {"text": 3}])), 1, "text")
    assert "value is missing (None)" in assert_names(
        raises_for(Dataset.from_list([{"text": "a"}, {"text": None}])), 1, "text"
    )


@pytest.mark.parametrize("label", [1, "yes", None])
def test_label_not_bool(label):
    rows = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": label}]
    message = assert_names(raises_for(stream(rows)), 1, "label")
    assert "a bool: True for a desirable completion" in message and "cast_column" in message


def test_label_as_int_column_rejected_in_arrow_dataset():
    data = Dataset.from_dict({"prompt": ["q"], "completion": ["a"], "label": [1]})
    assert_names(raises_for(data), 0, "label")


@pytest.mark.parametrize(
    "row",
    [
        {"chosen": "alpha", "rejected": "beta"},
        {"chosen": "abc", "rejected": "abd"},  # shares characters but not a word
        {"chosen": [user("one"), assistant("a")], "rejected": [user("two"), assistant("b")]},
    ],
)
def test_implicit_prompt_without_shared_prefix(row):
    message = assert_names(raises_for(stream([row])), 0, "chosen")
    assert "chosen and rejected share no prompt" in message


def test_implicit_prompt_that_differs_in_a_user_turn():
    row = {
        "chosen": [user("q"), assistant("a"), user("x"), assistant("b")],
        "rejected": [user("q"), assistant("a"), user("y"), assistant("b")],
    }
    message = assert_names(raises_for(stream([row])), 0, "chosen")
    assert "continues with a 'user' message" in message


def test_empty_messages_list():
    rows = [{"messages": [user("hi")]}, {"messages": []}]
    message = assert_names(raises_for(stream(rows)), 1, "messages")
    assert "the list of messages is empty" in message


@pytest.mark.parametrize(
    ("completion", "where"),
    [([assistant("a"), user("thanks")], "last"), ([user("hm"), assistant("a")], "first")],
)
def test_completion_must_be_assistant_turns(completion, where):
    rows = [
        {"prompt": [user("q")], "completion": [assistant("fine")]},
        {"prompt": [user("q")], "completion": completion},
    ]
    message = assert_names(raises_for(stream(rows)), 1, "completion")
    assert f"the {where} message of the completion has role" in message
    assert "start and end with an 'assistant' message" in message


def test_implicit_conversation_must_end_with_assistant():
    row = {"chosen": [user("q"), assistant("a"), user("more")], "rejected": [user("q"), assistant("b")]}
    message = assert_names(raises_for(stream([row])), 0, "chosen")
    assert "the last message of the chosen has role 'user'" in message


@pytest.mark.parametrize(
    ("row", "column", "problem"),
    [
        ({"input_ids": [1, 2, 3], "completion_mask": [0, 1]}, "completion_mask", "it has 2 values but input_ids has 3"),
        ({"input_ids": [1, 2], "assistant_masks": [0, 1, 1]}, "assistant_masks", "it has 3 values but input_ids has 2"),
        ({"input_ids": [1, 2], "attention_mask": [1]}, "attention_mask", "it has 1 values but input_ids has 2"),
        ({"input_ids": [1, 2], "completion_mask": [0, 2]}, "completion_mask", "it holds values [2]"),
        ({"input_ids": []}, "input_ids", "the list of token ids is empty"),
        ({"input_ids": "1 2 3"}, "input_ids", "found '1 2 3'"),
    ],
)
def test_tokenized_rows(row, column, problem):
    good = {k: [1, 1] for k in row}
    message = assert_names(raises_for(stream([good, row])), 1, column)
    assert problem in message


def test_error_points_at_the_right_row_and_max_rows_limits_the_check():
    rows = [{"prompt": "q", "completion": "a"}] * 1500 + [{"prompt": "q", "completion": ""}]
    data = Dataset.from_list(rows)
    assert_names(raises_for(data, batch_size=64), 1500, "completion")
    assert validate_dataset(data, max_rows=1500).kind == "prompt_completion"


def test_stream_is_checked_only_on_the_first_row_eagerly():
    rows = [{"text": "fine"}, {"text": ""}]
    assert validate_dataset(stream(rows)).kind == "language_modeling"
    assert_names(raises_for(stream(rows)), 1, "text")
    with pytest.raises(DatasetFormatError):
        validate_dataset(stream(rows), max_rows=2)


def test_empty_datasets():
    with pytest.raises(DatasetFormatError, match="no rows"):
        validate_dataset(Dataset.from_dict({"text": []}))
    with pytest.raises(DatasetFormatError, match="yields no rows"):
        detect_format(stream([]))


# ----------------------------------------------------------------------------- transforms


def test_extract_prompt_standard_cuts_at_a_word_boundary():
    row = {"chosen": "The sky is blue.", "rejected": "The sky is black.", "id": 7}
    assert extract_prompt(row) == {"prompt": "The sky is", "chosen": " blue.", "rejected": " black.", "id": 7}
    row = {"chosen": "Answer:\n\nYes", "rejected": "Answer:\n\nNo"}
    assert extract_prompt(row) == {"prompt": "Answer:", "chosen": "\n\nYes", "rejected": "\n\nNo"}
    row = {"chosen": "Q: two words", "rejected": "Q: two words and more"}  # one is a prefix of the other
    assert extract_prompt(row) == {"prompt": "Q: two", "chosen": " words", "rejected": " words and more"}


def test_extract_prompt_conversational_takes_the_shared_messages():
    shared = [{"role": "system", "content": "Be brief."}, user("q"), assistant("a"), user("q2")]
    row = {"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad")]}
    assert extract_prompt(row) == {"prompt": shared, "chosen": [assistant("good")], "rejected": [assistant("bad")]}


def test_extract_prompt_keeps_explicit_prompts():
    row = {"prompt": "p", "chosen": "p a", "rejected": "p b"}
    assert extract_prompt(row) == row and extract_prompt(row) is not row


def test_unpair_preference_row():
    row = {"chosen": "The sky is blue", "rejected": "The sky is red", "source": "x"}
    assert unpair_preference(row) == [
        {"source": "x", "prompt": "The sky is", "completion": " blue", "label": True},
        {"source": "x", "prompt": "The sky is", "completion": " red", "label": False},
    ]
    tokenized = {"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}
    assert unpair_preference(tokenized) == [
        {"prompt_input_ids": [1], "completion_input_ids": [2], "label": True},
        {"prompt_input_ids": [1], "completion_input_ids": [3], "label": False},
    ]


@pytest.mark.parametrize("streaming", [False, True])
def test_unpair_preference_dataset(streaming):
    rows = [
        {"prompt": [user("q1")], "chosen": [assistant("good1")], "rejected": [assistant("bad1")]},
        {"prompt": [user("q2")], "chosen": [assistant("good2")], "rejected": [assistant("bad2")]},
    ]
    data = stream(rows) if streaming else Dataset.from_list(rows)
    out = list(unpair_preference_dataset(data))
    assert [(r["prompt"][0]["content"], r["completion"][0]["content"], r["label"]) for r in out] == [
        ("q1", "good1", True),
        ("q1", "bad1", False),
        ("q2", "good2", True),
        ("q2", "bad2", False),
    ]
    fmt = detect_format(out[0])
    assert (fmt.kind, fmt.conversational) == ("unpaired_preference", True)


def test_unpair_preference_dataset_checks_rows():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}]
    assert_names(raises_for(Dataset.from_list(rows)), 1, "rejected")
    with pytest.raises(DatasetFormatError, match="Row 1"):
        unpair_preference_dataset(Dataset.from_list(rows))
    with pytest.raises(DatasetFormatError, match="Row 1"):
        list(unpair_preference_dataset(stream(rows)))


def test_unpair_preference_stream_keeps_extra_columns():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "source": "web"}]
    assert list(unpair_preference_dataset(stream(rows))) == [
        {"source": "web", "prompt": "q", "completion": "a", "label": True},
        {"source": "web", "prompt": "q", "completion": "b", "label": False},
    ]


def test_package_exports_resolve_lazily():
    import subprocess
    import sys

    code = (
        "import sys, honelm.data as d\n"
        "assert 'datasets' not in sys.modules and 'transformers' not in sys.modules, 'import is not lazy'\n"
        "missing = [n for n in d.__all__ if getattr(d, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert issubclass(d.DatasetFormatError, ValueError) and issubclass(d.ChatTemplateError, ValueError)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
