"""Dataset formats: detect which one a dataset uses and check every row before tokenizing.

A dataset is recognised by its column names (see ``docs/data.md`` for one example row of
each format):

==========================  ===========================================================
kind                        columns read
==========================  ===========================================================
``language_modeling``       ``text`` (standard) or ``messages`` (conversational)
``prompt_only``             ``prompt``
``prompt_completion``       ``prompt``, ``completion``
``preference``              ``prompt``, ``chosen``, ``rejected``; or ``chosen``,
                            ``rejected`` alone (implicit prompt: their shared prefix)
``unpaired_preference``     ``prompt``, ``completion``, ``label`` (a bool)
==========================  ===========================================================

Each text column holds either plain strings (*standard*) or lists of
``{"role": ..., "content": ...}`` messages (*conversational*); a conversational dataset may
also carry a ``tools`` column (a list of JSON-schema function descriptions, or a JSON
string of one). Already tokenized datasets use ``input_ids`` (optional
``completion_mask``, ``assistant_masks``, ``attention_mask``), ``prompt_input_ids``
(prompt-only), ``prompt_input_ids`` + ``completion_input_ids`` (prompt-completion; with
``label``: unpaired preference) or ``prompt_input_ids`` + ``chosen_input_ids`` +
``rejected_input_ids`` (preference); their :class:`DatasetFormat` has ``tokenized=True``
and the same ``kind`` as their text counterpart.

Extra columns are allowed and ignored.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DatasetFormatError

KINDS: tuple[str, ...] = (
    "language_modeling",
    "prompt_only",
    "prompt_completion",
    "preference",
    "unpaired_preference",
)
ALLOWED_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
# Columns that hold one value per token of ``input_ids`` in a tokenized dataset.
TOKEN_ALIGNED_COLUMNS: tuple[str, ...] = ("completion_mask", "assistant_masks", "attention_mask")

_PRETTY = {
    "language_modeling": "language modeling",
    "prompt_only": "prompt-only",
    "prompt_completion": "prompt-completion",
    "preference": "preference",
    "unpaired_preference": "unpaired preference",
}
_TEXT = "<text>"  # placeholder for ``dataset_text_field`` in the table below
# (kind, required columns, implicit prompt), most specific first: the first match wins.
_TEXT_LAYOUTS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("preference", ("prompt", "chosen", "rejected"), False),
    ("preference", ("chosen", "rejected"), True),
    ("unpaired_preference", ("prompt", "completion", "label"), False),
    ("prompt_completion", ("prompt", "completion"), False),
    ("language_modeling", ("messages",), False),
    ("language_modeling", (_TEXT,), False),
    ("prompt_only", ("prompt",), False),
)
_TOKENIZED_LAYOUTS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("preference", ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"), False),
    ("unpaired_preference", ("prompt_input_ids", "completion_input_ids", "label"), False),
    ("prompt_completion", ("prompt_input_ids", "completion_input_ids"), False),
    ("language_modeling", ("input_ids",), False),
    ("prompt_only", ("prompt_input_ids",), False),
)
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass(frozen=True)
class DatasetFormat:
    """What a dataset holds, as far as training is concerned.

    Attributes:
        kind: One of :data:`KINDS`.
        conversational: Text columns hold lists of messages rather than strings.
        implicit_prompt: Preference data without a ``prompt`` column; the prompt is the
            shared prefix of ``chosen`` and ``rejected`` (see :func:`extract_prompt`).
        tokenized: The rows are already token ids.
        columns: The columns this format reads, in order (optional ones such as ``tools``
            or ``completion_mask`` only when present).
    """

    kind: str
    conversational: bool = False
    implicit_prompt: bool = False
    tokenized: bool = False
    columns: tuple[str, ...] = ()

    @property
    def text_columns(self) -> tuple[str, ...]:
        """The columns holding strings or message lists (empty for tokenized formats)."""
        if self.tokenized:
            return ()
        return tuple(c for c in self.columns if c not in ("tools", "label"))

    def describe(self) -> str:
        """A short human description, e.g. ``"conversational preference (implicit prompt)"``."""
        form = "tokenized" if self.tokenized else "conversational" if self.conversational else "standard"
        extra = " (implicit prompt)" if self.implicit_prompt else ""
        return f"{form} {_PRETTY[self.kind]}{extra}"


# ----------------------------------------------------------------------------- detection


def is_conversational(value: Any) -> bool:
    """Whether ``value`` is a conversation: a non-empty list of dicts that have a ``role``."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], Mapping) and "role" in value[0]


def detect_format(
    data: Any,
    *,
    expected_kinds: Sequence[str] | None = None,
    dataset_text_field: str = "text",
) -> DatasetFormat:
    """Name the format of a dataset or of a single row, from its columns.

    Args:
        data: A ``datasets.Dataset``, a ``datasets.IterableDataset`` or one row (a dict).
            Standard vs conversational is read from the dataset features when they say
            (string vs list column), otherwise from the first row.
        expected_kinds: Only consider these kinds (for example ``("preference",)`` for a
            preference trainer). A dataset whose columns fit none of them is rejected with
            a message saying what it looks like instead.
        dataset_text_field: Name of the text column of standard language-modeling data.

    Raises:
        DatasetFormatError: No format fits the columns (the message lists the columns found
            and the columns each format needs).
    """
    kinds = _check_kinds(expected_kinds)
    columns, features, first_row = _inspect(data)
    kind, required, implicit, tokenized = _match_layout(columns, kinds, dataset_text_field)
    optional: tuple[str, ...] = ()
    if tokenized and kind == "language_modeling":
        optional = tuple(c for c in TOKEN_ALIGNED_COLUMNS if c in columns)
    elif not tokenized and "tools" in columns:
        optional = ("tools",)
    conversational = False
    if not tokenized:
        conversational = _detect_style(required, features, first_row)
    return DatasetFormat(kind, conversational, implicit, tokenized, (*required, *optional))


def _check_kinds(expected_kinds: Sequence[str] | None) -> tuple[str, ...]:
    if expected_kinds is None:
        return KINDS
    if isinstance(expected_kinds, str):
        expected_kinds = (expected_kinds,)
    unknown = [k for k in expected_kinds if k not in KINDS]
    if unknown or not expected_kinds:
        raise ValueError(f"expected_kinds={list(expected_kinds)!r}: each must be one of {KINDS}.")
    return tuple(expected_kinds)


def _inspect(data: Any) -> tuple[list[str], Any, Mapping[str, Any] | None]:
    """(column names, features or None, first row or None) of a dataset or a row."""
    if isinstance(data, Mapping):
        return list(data), None, data
    from datasets import Dataset, IterableDataset

    if isinstance(data, Dataset):
        return list(data.column_names), data.features, None
    if isinstance(data, IterableDataset):
        first = None
        if data.features is None:
            first = next(iter(data.with_format(None)), None)
            if first is None:
                raise DatasetFormatError("The iterable dataset yields no rows: there is nothing to train on.")
        columns = list(data.column_names) if data.column_names is not None else list(first or {})
        return columns, data.features, first
    raise TypeError(
        f"Expected a datasets.Dataset, a datasets.IterableDataset or a row (dict), got {type(data).__name__}."
    )


def _match_layout(
    columns: Sequence[str], kinds: Sequence[str], text_field: str
) -> tuple[str, tuple[str, ...], bool, bool]:
    present = set(columns)
    for tokenized, layouts in ((True, _TOKENIZED_LAYOUTS), (False, _TEXT_LAYOUTS)):
        for kind, required, implicit in layouts:
            required = tuple(text_field if c == _TEXT else c for c in required)
            if kind in kinds and present.issuperset(required):
                return kind, required, implicit, tokenized
    raise _missing_columns_error(columns, kinds, text_field)


def _missing_columns_error(columns: Sequence[str], kinds: Sequence[str], text_field: str) -> DatasetFormatError:
    present = set(columns)
    lines = [f"The dataset has columns {list(columns)}, which fit no {_kinds_phrase(kinds)} format."]
    fits_other = [k for k in KINDS if k not in kinds and _fits(present, k, text_field)]
    if fits_other:
        lines.append(f"They fit {_kinds_phrase(fits_other)} data, which is not accepted here.")
    lines.append("Each format reads these columns:")
    near_misses: list[list[str]] = []
    for kind, required, implicit in _TEXT_LAYOUTS + _TOKENIZED_LAYOUTS:
        if kind not in kinds:
            continue
        required = tuple(text_field if c == _TEXT else c for c in required)
        missing = [c for c in required if c not in present]
        note = f"  - {_PRETTY[kind]}{' (implicit prompt)' if implicit else ''}: {' + '.join(map(repr, required))}"
        if missing and len(missing) < len(required):
            note += f"  <- you have {[c for c in required if c in present]}, missing {missing}"
            near_misses.append(missing)
        lines.append(note)
    used = {
        c: [
            _PRETTY[k]
            for k, req, _ in _TEXT_LAYOUTS + _TOKENIZED_LAYOUTS
            if k in kinds and c in [text_field if r == _TEXT else r for r in req]
        ]
        for c in columns
    }
    known = {c: sorted(set(v)) for c, v in used.items() if v}
    if known:
        lines.append(
            "Columns of yours that formats read: " + "; ".join(f"{c!r} -> {', '.join(v)}" for c, v in known.items())
        )
    lines.append(
        "Fix: rename your columns to the ones above (e.g. dataset.rename_column('question', 'prompt')), "
        "or pass a formatting_func that turns a row into text or a list of messages."
    )
    nearest = min(near_misses, key=len, default=None)
    return DatasetFormatError("\n".join(lines), column=nearest[0] if nearest else None)


def _fits(present: set[str], kind: str, text_field: str) -> bool:
    for k, required, _ in _TEXT_LAYOUTS + _TOKENIZED_LAYOUTS:
        required = tuple(text_field if c == _TEXT else c for c in required)
        if k == kind and present.issuperset(required):
            return True
    return False


def _kinds_phrase(kinds: Sequence[str]) -> str:
    if tuple(kinds) == KINDS:
        return "supported"
    return " or ".join(_PRETTY[k] for k in kinds)


def _detect_style(required: Sequence[str], features: Any, first_row: Mapping[str, Any] | None) -> bool:
    """Whether the text columns are conversational, judged on the first text column that tells."""
    for column in required:
        if column == "label":
            continue
        if features is not None and column in features:
            style = _feature_style(features[column])
            if style is not None:
                return style
        if first_row is not None and first_row.get(column) is not None:
            return isinstance(first_row[column], (list, tuple))
    return False


def _feature_style(feature: Any) -> bool | None:
    from datasets import LargeList, List, Value
    from datasets import Sequence as SequenceFeature

    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return False
    if isinstance(feature, (List, LargeList, SequenceFeature, list)):
        return True
    return None


# ----------------------------------------------------------------------------- validation


def validate_dataset(
    dataset: Any,
    *,
    expected_kinds: Sequence[str] | None = None,
    max_rows: int | None = None,
    dataset_text_field: str = "text",
    batch_size: int = 1000,
) -> DatasetFormat:
    """Detect the format of ``dataset`` and check its rows; return the format.

    Only the columns the format reads are loaded, ``batch_size`` rows at a time.

    Args:
        dataset: A ``datasets.Dataset`` or ``datasets.IterableDataset``.
        expected_kinds: See :func:`detect_format`.
        max_rows: Check only the first ``max_rows`` rows. ``None`` checks every row of a
            ``Dataset``; for an ``IterableDataset`` it checks only the first row, because
            the rest is only known while streaming: use :func:`validate_stream` (or
            :func:`honelm.data.tokenize_dataset`, which does so) to check each row as it
            arrives.
        dataset_text_field: Name of the text column of standard language-modeling data.
        batch_size: Rows loaded per batch.

    Raises:
        DatasetFormatError: On the first bad row, naming its index and column.
    """
    from datasets import IterableDataset

    fmt = detect_format(dataset, expected_kinds=expected_kinds, dataset_text_field=dataset_text_field)
    if isinstance(dataset, IterableDataset):
        rows = dataset.select_columns(list(fmt.columns)).with_format(None)
        for index, row in enumerate(itertools.islice(rows, max_rows if max_rows is not None else 1)):
            validate_row(row, index, fmt)
        return fmt
    if len(dataset) == 0:
        raise DatasetFormatError("The dataset has no rows: there is nothing to train on.")
    subset = dataset.select_columns(list(fmt.columns)).with_format(None)
    stop = len(subset) if max_rows is None else min(len(subset), max_rows)
    for start in range(0, stop, batch_size):
        batch = subset[start : min(start + batch_size, stop)]
        for offset, row in enumerate(rows_of(batch)):
            validate_row(row, start + offset, fmt)
    return fmt


def validate_stream(dataset: Any, fmt: DatasetFormat | None = None, **detect_kwargs: Any) -> Any:
    """Return ``dataset`` (an ``IterableDataset``) with every row checked as it streams.

    The first bad row raises :class:`DatasetFormatError` during iteration, naming its
    position in the stream. ``detect_kwargs`` go to :func:`detect_format` when ``fmt`` is
    not given.
    """
    fmt = fmt if fmt is not None else detect_format(dataset, **detect_kwargs)

    def check(row: dict[str, Any], index: int) -> dict[str, Any]:
        validate_row(row, index, fmt)
        return {}

    return dataset.map(check, with_indices=True)


def column_names(dataset: Any) -> list[str]:
    """Column names of a dataset; for a stream without features, the keys of its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset.with_format(None)), {}))


def rows_of(batch: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Turn a columnar batch ``{column: [values]}`` into a list of row dicts."""
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def validate_row(row: Mapping[str, Any], index: int, fmt: DatasetFormat) -> None:
    """Check one row against ``fmt``; raise :class:`DatasetFormatError` naming what is wrong.

    ``index`` is the row's position, used in messages.
    """
    if fmt.tokenized:
        _validate_tokenized_row(row, index, fmt)
        return
    for column in fmt.columns:
        if column not in row:
            raise _error(
                index,
                column,
                "the column is missing from this row",
                "every row to have the same columns",
                "make sure every row has the same keys",
            )
    for column in fmt.text_columns:
        _check_form(row[column], index, column, fmt)
        if fmt.conversational:
            _validate_messages(row[column], index, column, _assistant_ends(column, fmt))
        else:
            _validate_text(row[column], index, column)
    if "tools" in fmt.columns:
        _validate_tools(row["tools"], index)
    if fmt.kind == "unpaired_preference":
        _validate_label(row["label"], index)
    if fmt.kind == "preference":
        _validate_pair(row, index, fmt)


def _error(index: int | None, column: str | None, problem: str, expected: str, fix: str) -> DatasetFormatError:
    where = f"Row {index}" if index is not None else "The dataset"
    if column is not None:
        where += f", column {column!r}"
    return DatasetFormatError(f"{where}: {problem}. Expected {expected}. Fix: {fix}.", row=index, column=column)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_form(value: Any, index: int, column: str, fmt: DatasetFormat) -> None:
    """Standard columns hold strings, conversational ones lists; anything else is named."""
    if value is None:
        raise _error(
            index,
            column,
            "the value is missing (None)",
            "a string" if not fmt.conversational else "a list of messages",
            f"fill or drop rows with missing values, e.g. dataset.filter(lambda row: row[{column!r}] is not None)",
        )
    is_list = isinstance(value, (list, tuple))
    if isinstance(value, str) or is_list:
        if is_list != fmt.conversational:
            found = "a list of messages (conversational)" if is_list else "a plain string (standard)"
            expected = (
                "a list of messages, like the other text columns and rows"
                if fmt.conversational
                else "a plain string, like the other text columns and rows"
            )
            raise _error(
                index,
                column,
                f"found {found}, but this dataset is {'conversational' if fmt.conversational else 'standard'} "
                f"(decided from its first text column {fmt.text_columns[0]!r})",
                expected,
                "use one form throughout: either strings in every text column of every row, or lists of "
                "{'role': ..., 'content': ...} messages in every one (a string prompt becomes "
                "[{'role': 'user', 'content': prompt}], a string completion "
                "[{'role': 'assistant', 'content': completion}])",
            )
        return
    raise _error(
        index,
        column,
        f"found a {type(value).__name__} ({_short(value)})",
        "a string or a list of {'role': ..., 'content': ...} messages",
        f"convert the column to text, e.g. dataset.map(lambda row: {{{column!r}: str(row[{column!r}])}})",
    )


def _validate_text(value: str, index: int, column: str) -> None:
    if not value.strip():
        raise _error(
            index,
            column,
            f"the {column} is empty ({_short(value)})",
            "a non-empty string",
            f"drop such rows first, e.g. dataset.filter(lambda row: row[{column!r}].strip() != '')",
        )


def _assistant_ends(column: str, fmt: DatasetFormat) -> tuple[str, ...]:
    """Which ends of a message list must be assistant messages: a completion both, an
    implicit-prompt conversation the last (its first reply is checked by extract_prompt)."""
    if column not in ("completion", "chosen", "rejected"):
        return ()
    return ("last",) if fmt.implicit_prompt else ("first", "last")


def _validate_messages(messages: Sequence[Any], index: int, column: str, assistant_ends: tuple[str, ...]) -> None:
    if len(messages) == 0:
        raise _error(
            index,
            column,
            "the list of messages is empty",
            "at least one message",
            f"drop such rows first, e.g. dataset.filter(lambda row: len(row[{column!r}]) > 0)",
        )
    for position, message in enumerate(messages):
        _validate_message(message, index, column, position)
    for where in assistant_ends:
        message = messages[0] if where == "first" else messages[-1]
        if message["role"] != "assistant":
            raise _error(
                index,
                column,
                f"the {where} message of the {column} has role {message['role']!r}",
                f"the {column} to {' and '.join(('start' if w == 'first' else 'end') for w in assistant_ends)} "
                "with an 'assistant' message (it is what the model learns to say)",
                "move the other messages into the prompt, or drop the row",
            )


def _validate_message(message: Any, index: int, column: str, position: int) -> None:
    at = f"message {position}"
    if not isinstance(message, Mapping):
        raise _error(
            index,
            column,
            f"{at} is a {type(message).__name__} ({_short(message)})",
            "a dict with 'role' and 'content'",
            "turn each message into {'role': ..., 'content': ...}",
        )
    if message.get("role") is None:
        hint = (
            " (this looks like ShareGPT style {'from': ..., 'value': ...}; rename 'from' to 'role' and 'value' "
            "to 'content', and map 'human' to 'user', 'gpt' to 'assistant')"
            if "from" in message
            else ""
        )
        raise _error(
            index,
            column,
            f"{at} has no 'role' (keys: {sorted(message)}){hint}",
            f"a 'role', one of {list(ALLOWED_ROLES)}",
            "add the role of every message",
        )
    role = message["role"]
    if role not in ALLOWED_ROLES:
        suggestion = f"; {role!r} is probably {_SHAREGPT_ROLES[role]!r}" if role in _SHAREGPT_ROLES else ""
        raise _error(
            index,
            column,
            f"{at} has role {_short(role)}{suggestion}",
            f"one of {list(ALLOWED_ROLES)}",
            f"map the roles, e.g. dataset.map(lambda row: {{{column!r}: [{{**m, 'role': {{'bot': 'assistant', "
            f"'human': 'user'}}.get(m['role'], m['role'])}} for m in row[{column!r}]]}})",
        )
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        _validate_tool_calls(tool_calls, index, column, position, role)
    if "content" not in message and not tool_calls:
        raise _error(
            index,
            column,
            f"{at} ({role}) has no 'content' (keys: {sorted(message)})",
            "a 'content' string in every message",
            "add the text of every message under 'content'",
        )
    content = message.get("content")
    if content is None and tool_calls:
        return
    if not isinstance(content, str):
        raise _error(
            index,
            column,
            f"{at} ({role}) has content {_short(content)} of type {type(content).__name__}",
            "a string (only an assistant message with 'tool_calls' may have no content)",
            "convert the content to text, e.g. str(...), or drop the row",
        )
    if role == "assistant" and not tool_calls and not content.strip():
        raise _error(
            index,
            column,
            f"{at} (assistant) is empty",
            "a non-empty assistant message",
            "drop rows with empty assistant messages",
        )


def _validate_tool_calls(tool_calls: Any, index: int, column: str, position: int, role: str) -> None:
    at = f"message {position}"
    if role != "assistant":
        raise _error(
            index,
            column,
            f"{at} has 'tool_calls' but role {role!r}",
            "tool calls only on assistant messages",
            "set the role of messages that call tools to 'assistant'",
        )
    if not isinstance(tool_calls, (list, tuple)):
        raise _error(
            index,
            column,
            f"{at} has 'tool_calls' of type {type(tool_calls).__name__}",
            "a list of {'type': 'function', 'function': {'name': ..., 'arguments': ...}}",
            "wrap a single call in a list",
        )
    for call in tool_calls:
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise _error(
                index,
                column,
                f"{at} has a tool call without a function name: {_short(call)}",
                "{'type': 'function', 'function': {'name': ..., 'arguments': ...}}",
                "give every tool call a function name and arguments",
            )


def _validate_tools(tools: Any, index: int) -> None:
    if tools is None:
        return
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise _error(
                index,
                "tools",
                f"the tools string is not valid JSON ({exc})",
                "a list of JSON-schema function descriptions (or a JSON string of one)",
                "store the tools as a list of dicts or as json.dumps(tools)",
            ) from None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise _error(
            index,
            "tools",
            f"found {_short(tools)}",
            "a list of JSON-schema function descriptions (dicts)",
            "store one dict per tool, e.g. {'type': 'function', 'function': {'name': ..., 'parameters': ...}}",
        )


def _validate_label(label: Any, index: int) -> None:
    if not _is_bool(label):
        raise _error(
            index,
            "label",
            f"found {_short(label)} of type {type(label).__name__}",
            "a bool: True for a desirable completion, False for an undesirable one",
            "convert it, e.g. dataset.map(lambda row: {'label': row['label'] == 1}) or "
            "dataset.cast_column('label', datasets.Value('bool'))",
        )


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def _validate_pair(row: Mapping[str, Any], index: int, fmt: DatasetFormat) -> None:
    if row["chosen"] == row["rejected"]:
        raise _error(
            index,
            "rejected",
            "chosen and rejected are identical",
            "two different completions to compare",
            "drop such rows first, e.g. dataset.filter(lambda row: row['chosen'] != row['rejected'])",
        )
    if fmt.implicit_prompt:
        extract_prompt(row, index=index)


# ----------------------------------------------------------------------------- transforms


def extract_prompt(row: Mapping[str, Any], *, index: int | None = None) -> dict[str, Any]:
    """Turn an implicit-prompt preference row into an explicit one.

    Rows that already have a ``prompt`` are returned unchanged (as a new dict).

    * Conversational: the prompt is the leading messages that ``chosen`` and ``rejected``
      share; the rest of each is its completion, which must start with an assistant message.
    * Standard: the prompt is the longest common prefix of the two strings, shortened to end
      just before its last run of whitespace, so that each completion starts at a word
      boundary (``"The sky is"`` + ``" blue"`` / ``" black"``, not ``"The sky is bl"`` +
      ``"ue"`` / ``"ack"``). Tokenizers attach the leading space to the next word, so the
      pieces tokenize like the original text.

    Raises:
        DatasetFormatError: When the two share no prefix (``index`` names the row).
    """
    out = dict(row)
    if "prompt" in row:
        return out
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = isinstance(chosen, (list, tuple))
    if conversational:
        shared = _shared_message_count(chosen, rejected)
        prompt, chosen_rest, rejected_rest = list(chosen[:shared]), list(chosen[shared:]), list(rejected[shared:])
    else:
        prompt = _shared_text_prefix(chosen, rejected)
        chosen_rest, rejected_rest = chosen[len(prompt) :], rejected[len(prompt) :]
    if not prompt:
        raise _error(
            index,
            "chosen",
            f"chosen and rejected share no prompt (chosen starts with "
            f"{_short(chosen[:1] if conversational else chosen[:40])}, rejected with "
            f"{_short(rejected[:1] if conversational else rejected[:40])})",
            "an implicit prompt: chosen and rejected both starting with the same prompt",
            "add a 'prompt' column with the prompt, and keep only the answers in chosen and rejected",
        )
    for column, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
        if not rest or (not conversational and not rest.strip()):
            raise _error(
                index,
                column,
                f"nothing is left of the {column} after the shared prompt",
                "a non-empty completion after the prompt",
                "drop the row, or give it an explicit 'prompt'",
            )
        if conversational and rest[0].get("role") != "assistant":
            raise _error(
                index,
                column,
                f"after the {len(prompt)} shared message(s), the {column} continues with a "
                f"{rest[0].get('role')!r} message",
                "chosen and rejected to differ from an assistant message on (the shared messages are the prompt)",
                "give the rows an explicit 'prompt' column",
            )
    out.update(prompt=prompt, chosen=chosen_rest, rejected=rejected_rest)
    return {"prompt": out.pop("prompt"), **out}


def _shared_message_count(chosen: Sequence[Any], rejected: Sequence[Any]) -> int:
    count = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        count += 1
    return count


def _shared_text_prefix(chosen: str, rejected: str) -> str:
    length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        length += 1
    prefix = chosen[:length]
    end = len(prefix)
    while end > 0 and not prefix[end - 1].isspace():  # back off over the partial word
        end -= 1
    while end > 0 and prefix[end - 1].isspace():  # and over the whitespace before it
        end -= 1
    return prefix[:end]


def unpair_preference(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Split one preference row into two unpaired rows: chosen (``label=True``), rejected (``False``).

    Works for standard, conversational (implicit prompts are made explicit first) and
    tokenized rows; other columns are copied to both rows.
    """
    if "chosen_input_ids" in row:
        keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
        rest = {k: v for k, v in row.items() if k not in keys}
        return [
            {**rest, "prompt_input_ids": row["prompt_input_ids"], "completion_input_ids": row[c], "label": c == keys[1]}
            for c in keys[1:]
        ]
    explicit = extract_prompt(row)
    rest = {k: v for k, v in explicit.items() if k not in ("prompt", "chosen", "rejected")}
    return [
        {**rest, "prompt": explicit["prompt"], "completion": explicit[c], "label": c == "chosen"}
        for c in ("chosen", "rejected")
    ]


def unpair_preference_dataset(dataset: Any, *, num_proc: int | None = None) -> Any:
    """Apply :func:`unpair_preference` to a whole ``Dataset`` or ``IterableDataset``.

    Each preference row becomes two consecutive rows (chosen first). The input is checked
    with :func:`validate_dataset` (or as it streams) first.
    """
    from datasets import IterableDataset

    fmt = detect_format(dataset, expected_kinds=("preference",))
    streaming = isinstance(dataset, IterableDataset)
    if not streaming:
        validate_dataset(dataset, expected_kinds=("preference",))

    def split(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = rows_of(batch)
        if streaming:
            for row, index in zip(rows, indices):
                validate_row(row, index, fmt)
        out_rows = [r for row in rows for r in unpair_preference(row)]
        return {k: [r[k] for r in out_rows] for k in out_rows[0]} if out_rows else {}

    kwargs: dict[str, Any] = {} if streaming else {"num_proc": num_proc}
    return dataset.map(split, batched=True, with_indices=True, remove_columns=column_names(dataset), **kwargs)


def _validate_tokenized_row(row: Mapping[str, Any], index: int, fmt: DatasetFormat) -> None:
    for column in fmt.columns:
        if column == "label":
            _validate_label(row[column], index)
            continue
        value = row.get(column)
        if not isinstance(value, (list, tuple)) or (value and not _is_int(value[0])):
            raise _error(
                index,
                column,
                f"found {_short(value)}",
                "a list of token ids (ints)",
                "tokenize the column, or drop it so that honelm tokenizes the text columns",
            )
        if not value and column in ("input_ids", "chosen_input_ids", "rejected_input_ids", "completion_input_ids"):
            raise _error(
                index,
                column,
                "the list of token ids is empty",
                "at least one token",
                f"drop such rows first, e.g. dataset.filter(lambda row: len(row[{column!r}]) > 0)",
            )
    for column in fmt.columns:
        if column in TOKEN_ALIGNED_COLUMNS:
            n_ids, n_mask = len(row["input_ids"]), len(row[column])
            if n_mask != n_ids:
                raise _error(
                    index,
                    column,
                    f"it has {n_mask} values but input_ids has {n_ids} tokens",
                    f"one value per token ({n_ids})",
                    f"rebuild {column} together with input_ids",
                )
            if not set(row[column]) <= {0, 1}:
                raise _error(
                    index,
                    column,
                    f"it holds values {sorted(set(row[column]) - {0, 1})[:5]}",
                    "only 0 and 1",
                    f"rebuild {column} as a 0/1 mask",
                )
    if fmt.kind == "preference" and row["chosen_input_ids"] == row["rejected_input_ids"]:
        raise _error(
            index,
            "rejected_input_ids",
            "chosen and rejected are identical",
            "two different completions to compare",
            "drop such rows first",
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or type(value).__name__.startswith(("int", "uint"))
