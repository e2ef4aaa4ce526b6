"""Render rows with the chat template, tokenize them and build the loss masks.

Output columns by format (see ``docs/data.md``):

======================  ==============================================================
kind                    columns produced
======================  ==============================================================
language modeling       ``input_ids``; ``assistant_masks`` with ``assistant_only_loss``
prompt-completion       ``input_ids``, ``completion_mask``; plus ``assistant_masks``
                        with ``assistant_only_loss`` (conversational only)
prompt-only             ``prompt_input_ids``
preference              ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``
unpaired preference     ``prompt_input_ids``, ``completion_input_ids``, ``label``
======================  ==============================================================

Standard text is encoded without special tokens and then assembled: the tokenizer's own
leading special tokens (BOS, for tokenizers that add one) go in front of the prompt (or the
text) once, and EOS is appended to the text or completion unless it already ends with it.
Conversational rows go through ``tokenizer.apply_chat_template``, which decides BOS and
the end of each turn; no EOS is appended to them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ChatTemplateError, DatasetFormatError
from .formats import (
    TOKEN_ALIGNED_COLUMNS,
    DatasetFormat,
    column_names,
    detect_format,
    extract_prompt,
    rows_of,
    validate_dataset,
    validate_row,
)

TRUNCATION_MODES: tuple[str, ...] = ("keep_start", "keep_end")
_DROPPED_COLUMN = "__honelm_truncated_tokens__"
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ----------------------------------------------------------------------------- statistics


@dataclass
class TruncationStats:
    """How much truncation to ``max_length`` cut from a dataset.

    For an ``IterableDataset`` the counts grow as rows stream through (``complete`` is
    ``False``), and only rows read in this process are counted: a ``DataLoader`` with
    worker processes tokenizes in the workers, whose counts do not come back.
    """

    max_length: int | None
    num_rows: int = 0
    num_truncated: int = 0
    tokens_dropped: int = 0
    max_tokens_dropped: int = 0
    complete: bool = True

    def add(self, dropped: int) -> None:
        """Record one row from which ``dropped`` tokens were cut (0 when it fit)."""
        self.num_rows += 1
        if dropped > 0:
            self.num_truncated += 1
            self.tokens_dropped += dropped
            self.max_tokens_dropped = max(self.max_tokens_dropped, dropped)

    @property
    def fraction_truncated(self) -> float:
        """Share of rows that were truncated (0.0 for no rows)."""
        return self.num_truncated / self.num_rows if self.num_rows else 0.0

    def summary(self) -> str:
        """One line for people, e.g. ``"37 of 1,000 rows (3.7%) were truncated at ..."``."""
        seen = "" if self.complete else " seen so far"
        if self.max_length is None:
            return f"Truncation is off (max_length=None); {self.num_rows:,} rows{seen}."
        if self.num_truncated == 0:
            return f"No row was truncated at max_length={self.max_length} ({self.num_rows:,} rows{seen})."
        return (
            f"{self.num_truncated:,} of {self.num_rows:,} rows{seen} ({100 * self.fraction_truncated:.1f}%) were "
            f"truncated at max_length={self.max_length}, losing {self.tokens_dropped:,} tokens "
            f"(max {self.max_tokens_dropped:,} in one row)."
        )

    def __str__(self) -> str:
        return self.summary()


def _check_truncation(max_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation_mode={truncation_mode!r}: expected 'keep_start' (drop the end of long rows) or "
            "'keep_end' (drop the beginning)."
        )
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length={max_length!r}: expected a positive int, or None to keep rows whole.")


# ----------------------------------------------------------------------------- truncation


def truncate_row(
    row: Mapping[str, Any], max_length: int | None, truncation_mode: str = "keep_start"
) -> tuple[dict[str, Any], int]:
    """Cut a tokenized row to ``max_length`` tokens; return the new row and the tokens cut.

    * ``input_ids`` rows: ``input_ids`` and every mask aligned with it
      (``completion_mask``, ``assistant_masks``, ``attention_mask``) lose the same positions.
    * Prompt + completion(s) rows (preference, unpaired, prompt-only): the limit applies to
      the prompt plus each completion. ``keep_start`` keeps the prompt (cut to
      ``max_length`` if it alone is longer) and cuts the end of each completion;
      ``keep_end`` cuts the beginning of the shared prompt (by as much as the longest
      completion needs) and then, if still too long, the beginning of the completions.
      The prompt is counted once in the tokens cut.
    """
    _check_truncation(max_length, truncation_mode)
    out = dict(row)
    if max_length is None:
        return out, 0
    if "input_ids" in row:
        n = len(row["input_ids"])
        if n <= max_length:
            return out, 0
        keep = slice(0, max_length) if truncation_mode == "keep_start" else slice(n - max_length, n)
        for column in ("input_ids", *TOKEN_ALIGNED_COLUMNS):
            if column in out:
                out[column] = list(out[column][keep])
        return out, n - max_length
    names = [c for c in ("chosen_input_ids", "rejected_input_ids", "completion_input_ids") if c in row]
    prompt, completions = _truncate_pair(row["prompt_input_ids"], [row[c] for c in names], max_length, truncation_mode)
    dropped = len(row["prompt_input_ids"]) - len(prompt)
    out["prompt_input_ids"] = prompt
    for name, new in zip(names, completions):
        dropped += len(row[name]) - len(new)
        out[name] = new
    return out, dropped


def _truncate_pair(
    prompt: Sequence[int], completions: list[Sequence[int]], max_length: int, mode: str
) -> tuple[list[int], list[list[int]]]:
    if mode == "keep_start":
        prompt = list(prompt[:max_length])
        budget = max_length - len(prompt)
        return prompt, [list(c[:budget]) for c in completions]
    longest = max((len(c) for c in completions), default=0)
    cut = min(max(len(prompt) + longest - max_length, 0), len(prompt))
    prompt = list(prompt[cut:])
    budget = max_length - len(prompt)
    return prompt, [list(c[len(c) - budget :]) if len(c) > budget else list(c) for c in completions]


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class _Context:
    """Everything tokenization needs about the tokenizer, computed once."""

    tokenizer: Any
    eos_id: int
    end_of_turn_ids: frozenset[int]
    bos_id: int | None
    prefix_ids: list[int]  # special tokens plain encoding puts in front of text (BOS), if any
    assistant_only_loss: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


def has_generation_markers(tokenizer_or_template: Any) -> bool:
    """Whether a chat template (or a tokenizer's) marks assistant turns with ``{% generation %}``."""
    template = tokenizer_or_template
    if not isinstance(template, str):
        template = getattr(tokenizer_or_template, "chat_template", None)
    if isinstance(template, Mapping):
        template = "\n".join(str(t) for t in template.values())
    return bool(template) and _GENERATION_MARKER.search(template) is not None


def _make_context(
    tokenizer: Any,
    fmt: DatasetFormat,
    *,
    eos_token: str | None = None,
    assistant_only_loss: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> _Context:
    eos = eos_token if eos_token is not None else tokenizer.eos_token
    if eos is None:
        raise ValueError("The tokenizer has no EOS token. Pass eos_token='...' naming the token that ends a text.")
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    if not isinstance(eos_id, int) or tokenizer.convert_ids_to_tokens(eos_id) != eos:
        raise ValueError(
            f"eos_token={eos!r} is not a single token of this tokenizer. Pass a token from its vocabulary "
            f"(its EOS is {tokenizer.eos_token!r}), or add it first: tokenizer.add_special_tokens("
            f"{{'additional_special_tokens': [{eos!r}]}}) and resize the model's embeddings."
        )
    if fmt.conversational and not fmt.tokenized and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "The dataset is conversational (lists of messages) but the tokenizer has no chat template. "
            "Fix: load the tokenizer of the instruct/chat variant of the model, or set tokenizer.chat_template "
            "to a Jinja template before training."
        )
    if assistant_only_loss:
        _check_assistant_masks(tokenizer, fmt)
    ends = {eos_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    return _Context(
        tokenizer=tokenizer,
        eos_id=eos_id,
        end_of_turn_ids=frozenset(ends),
        bos_id=tokenizer.bos_token_id,
        prefix_ids=_leading_special_ids(tokenizer),
        assistant_only_loss=assistant_only_loss,
        chat_template_kwargs=dict(chat_template_kwargs or {}),
    )


def _check_assistant_masks(tokenizer: Any, fmt: DatasetFormat) -> None:
    if fmt.tokenized or not fmt.conversational or fmt.kind not in ("language_modeling", "prompt_completion"):
        raise ValueError(
            f"assistant_only_loss=True needs conversational language-modeling or prompt-completion data "
            f"(a 'messages' column, or 'prompt'/'completion' message lists); this dataset is {fmt.describe()}. "
            "Fix: set assistant_only_loss=False (prompt-completion data is already trained on the completion only)."
        )
    if not has_generation_markers(tokenizer):
        raise ChatTemplateError(
            "assistant_only_loss=True needs a chat template that wraps assistant replies in "
            "{% generation %} ... {% endgeneration %}, so that the assistant tokens can be found; this "
            "tokenizer's template has no such markers. Fix: add the markers around the assistant content "
            "(and its end-of-turn token) in tokenizer.chat_template, or use prompt-completion data "
            "(the completion is then the only part trained on)."
        )


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids plain ``tokenizer(text)`` puts before the text (e.g. ``[bos_id]``), found by probing."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _encode(ctx: _Context, texts: list[str]) -> list[list[int]]:
    """Batch-encode texts without special tokens (special-token strings in the text still count)."""
    if not texts:
        return []
    return [list(ids) for ids in ctx.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _with_prefix(ctx: _Context, ids: list[int]) -> list[int]:
    prefix = ctx.prefix_ids
    if prefix and ids[: len(prefix)] != prefix:
        return prefix + ids
    return ids


def _with_eos(ctx: _Context, ids: list[int]) -> list[int]:
    return ids if ids and ids[-1] == ctx.eos_id else ids + [ctx.eos_id]


def _assemble(
    kind: str, prompt: list[int], completions: dict[str, list[int]], row: Mapping[str, Any]
) -> dict[str, Any]:
    """Lay out prompt and completion ids in the columns of ``kind``."""
    if kind == "prompt_completion":
        completion = completions["completion"]
        return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
    if kind == "preference":
        return {
            "prompt_input_ids": prompt,
            "chosen_input_ids": completions["chosen"],
            "rejected_input_ids": completions["rejected"],
        }
    if kind == "unpaired_preference":
        return {
            "prompt_input_ids": prompt,
            "completion_input_ids": completions["completion"],
            "label": bool(row["label"]),
        }
    return {"prompt_input_ids": prompt}  # prompt_only


def _completion_columns(kind: str) -> tuple[str, ...]:
    if kind == "preference":
        return ("chosen", "rejected")
    if kind in ("prompt_completion", "unpaired_preference"):
        return ("completion",)
    return ()


def _tokenize_standard(rows: list[Mapping[str, Any]], fmt: DatasetFormat, ctx: _Context) -> list[dict[str, Any]]:
    if fmt.kind == "language_modeling":
        texts = _encode(ctx, [row[fmt.columns[0]] for row in rows])
        return [{"input_ids": _with_eos(ctx, _with_prefix(ctx, ids))} for ids in texts]
    prompts = [_with_prefix(ctx, ids) for ids in _encode(ctx, [row["prompt"] for row in rows])]
    completions = {
        column: [_with_eos(ctx, ids) for ids in _encode(ctx, [row[column] for row in rows])]
        for column in _completion_columns(fmt.kind)
    }
    return [
        _assemble(fmt.kind, prompt, {c: ids[i] for c, ids in completions.items()}, rows[i])
        for i, prompt in enumerate(prompts)
    ]


def _drop_none(value: Any) -> Any:
    """Remove ``None`` entries from nested dicts (Arrow fills keys missing in some rows with None)."""
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def _row_tools(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = row.get("tools")
    if isinstance(tools, str):
        import json

        tools = json.loads(tools)
    return _drop_none(tools) if tools else None


def _render(
    ctx: _Context,
    messages: Sequence[Mapping[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    assistant_masks: bool = False,
) -> tuple[list[int], list[int] | None]:
    """Token ids (and the assistant mask, when asked) of one conversation rendered by the template."""
    out = ctx.tokenizer.apply_chat_template(
        _drop_none(list(messages)),
        tools=tools,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        return_assistant_tokens_mask=assistant_masks,
        **ctx.chat_template_kwargs,
    )
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"]) if assistant_masks else None
    if ctx.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == ctx.bos_id:
        ids = ids[1:]  # template wrote BOS and the encoding added another: keep one
        mask = mask[1:] if mask is not None else None
    return ids, mask


def _continuation(ctx: _Context, prompt_ids: list[int], full_ids: list[int], index: int, column: str) -> list[int]:
    """The tokens ``full_ids`` adds after ``prompt_ids``, ending at the last end-of-turn token."""
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(n, len(full_ids)))
        decode = ctx.tokenizer.decode
        raise ChatTemplateError(
            f"Row {index}, column {column!r}: the chat template is not prefix-stable. The prompt rendered with "
            f"add_generation_prompt=True is not a token prefix of the prompt + {column} rendered together; they "
            f"differ from token {at}: prompt render has {decode(prompt_ids[at : at + 8])!r}, full render has "
            f"{decode(full_ids[at : at + 8])!r}. This happens with templates that render earlier turns or the "
            "generation prompt differently once a reply follows (for example adding or removing reasoning "
            "blocks). Fix: use a template whose generation prompt matches how it renders the assistant turn, "
            "or train on the 'messages' format with assistant_only_loss=True.",
            row=index,
        )
    rest = full_ids[n:]
    return rest[: _end_of_turn_length(ctx, rest)]


def _end_of_turn_length(ctx: _Context, ids: list[int]) -> int:
    """Length of ``ids`` up to and including its last end-of-turn token, when only whitespace follows it."""
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] in ctx.end_of_turn_ids:
            tail = ids[j + 1 :]
            return j + 1 if not tail or not ctx.tokenizer.decode(tail).strip() else len(ids)
    return len(ids)


def _tokenize_conversational(row: Mapping[str, Any], index: int, fmt: DatasetFormat, ctx: _Context) -> dict[str, Any]:
    if fmt.implicit_prompt:
        row = extract_prompt(row, index=index)
    tools = _row_tools(row)
    if fmt.kind == "language_modeling":
        messages = row[fmt.columns[0]]
        ids, mask = _render(ctx, messages, tools, assistant_masks=ctx.assistant_only_loss)
        if mask is None:
            return {"input_ids": ids}
        _check_mask_found(mask, messages, index, fmt.columns[0])
        return {"input_ids": ids, "assistant_masks": mask}
    prompt = list(row["prompt"])
    if fmt.kind == "prompt_only":
        prefill = prompt[-1]["role"] == "assistant"  # the model continues a started reply
        ids, _ = _render(ctx, prompt, tools, add_generation_prompt=not prefill, continue_final_message=prefill)
        return {"prompt_input_ids": ids}
    prompt_ids, _ = _render(ctx, prompt, tools, add_generation_prompt=True)
    completions: dict[str, list[int]] = {}
    full_mask: list[int] | None = None
    for column in _completion_columns(fmt.kind):
        masks = ctx.assistant_only_loss and fmt.kind == "prompt_completion"
        full_ids, full_mask = _render(ctx, prompt + list(row[column]), tools, assistant_masks=masks)
        completions[column] = _continuation(ctx, prompt_ids, full_ids, index, column)
    out = _assemble(fmt.kind, prompt_ids, completions, row)
    if full_mask is not None:
        _check_mask_found(full_mask, row["completion"], index, "completion")
        out["assistant_masks"] = full_mask[: len(out["input_ids"])]
    return out


def _check_mask_found(mask: list[int], messages: Sequence[Mapping[str, Any]], index: int, column: str) -> None:
    if any(m.get("role") == "assistant" for m in messages) and not any(mask):
        raise ChatTemplateError(
            f"Row {index}, column {column!r}: the conversation has assistant messages but the template's "
            "{% generation %} blocks marked no token. Fix: make sure the assistant content is rendered inside "
            "{% generation %} ... {% endgeneration %} in tokenizer.chat_template.",
            row=index,
        )


def _from_tokenized(row: Mapping[str, Any], fmt: DatasetFormat) -> dict[str, Any]:
    if fmt.kind == "prompt_completion":
        prompt, completion = list(row["prompt_input_ids"]), list(row["completion_input_ids"])
        return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
    return {c: (row[c] if c == "label" else list(row[c])) for c in fmt.columns}


def _tokenize_rows(
    rows: list[Mapping[str, Any]], indices: Sequence[int], fmt: DatasetFormat, ctx: _Context
) -> list[dict[str, Any]]:
    if fmt.tokenized:
        return [_from_tokenized(row, fmt) for row in rows]
    if fmt.conversational:
        return [_tokenize_conversational(row, index, fmt, ctx) for row, index in zip(rows, indices)]
    if fmt.implicit_prompt:
        rows = [extract_prompt(row, index=index) for row, index in zip(rows, indices)]
    return _tokenize_standard(rows, fmt, ctx)


def tokenize_row(
    row: Mapping[str, Any],
    tokenizer: Any,
    fmt: DatasetFormat | None = None,
    *,
    index: int = 0,
    eos_token: str | None = None,
    assistant_only_loss: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check and tokenize one row of any supported format (no truncation: see :func:`truncate_row`).

    ``fmt`` defaults to :func:`detect_format` of the row; ``index`` is used in error messages.
    Returns the columns listed in this module's docstring.
    """
    fmt = fmt if fmt is not None else detect_format(row)
    validate_row(row, index, fmt)
    ctx = _make_context(
        tokenizer,
        fmt,
        eos_token=eos_token,
        assistant_only_loss=assistant_only_loss,
        chat_template_kwargs=chat_template_kwargs,
    )
    return _tokenize_rows([row], [index], fmt, ctx)[0]


# ----------------------------------------------------------------------------- datasets


class _BatchTokenizer:
    """The function given to ``dataset.map``: tokenize, truncate, count what was cut."""

    def __init__(
        self, fmt: DatasetFormat, ctx: _Context, max_length: int | None, mode: str, stats: TruncationStats | None
    ) -> None:
        self.fmt, self.ctx, self.max_length, self.mode, self.stats = fmt, ctx, max_length, mode, stats

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = rows_of(batch)
        if self.stats is not None:  # streaming: rows are checked as they arrive
            for row, index in zip(rows, indices):
                validate_row(row, index, self.fmt)
        out_rows, dropped = [], []
        for tokenized in _tokenize_rows(rows, indices, self.fmt, self.ctx):
            truncated, n = truncate_row(tokenized, self.max_length, self.mode)
            out_rows.append(truncated)
            dropped.append(n)
            if self.stats is not None:
                self.stats.add(n)
        if not out_rows:
            return {}
        columns = {key: [r[key] for r in out_rows] for key in out_rows[0]}
        if self.stats is None:
            columns[_DROPPED_COLUMN] = dropped
        return columns


def apply_formatting_func(
    dataset: Any,
    formatting_func: Callable[[dict[str, Any]], Any],
    *,
    dataset_text_field: str = "text",
    num_proc: int | None = None,
) -> Any:
    """Replace every row by ``formatting_func(row)``: a string becomes the ``dataset_text_field``
    column, a list of messages the ``messages`` column (the first row decides which)."""
    from datasets import IterableDataset

    streaming = isinstance(dataset, IterableDataset)
    if streaming:
        first = next(iter(dataset.with_format(None)), None)
    else:
        first = dataset.with_format(None)[0] if len(dataset) else None
    if first is None:
        raise DatasetFormatError("The dataset has no rows: there is nothing to train on.")
    first_type = type(formatting_func(first)).__name__
    column = _formatted_column(formatting_func(first), 0, dataset_text_field)

    def format_row(row: dict[str, Any], index: int) -> dict[str, Any]:
        value = formatting_func(row)
        if _formatted_column(value, index, dataset_text_field) != column:
            raise DatasetFormatError(
                f"Row {index}, column {column!r}: formatting_func returned a {type(value).__name__} here but a "
                f"{first_type} for row 0. Expected the same kind of value for every row. "
                "Fix: make formatting_func return always a string, or always a list of messages.",
                row=index,
                column=column,
            )
        return {column: value}

    kwargs: dict[str, Any] = {} if streaming else {"num_proc": num_proc}
    return dataset.map(format_row, with_indices=True, remove_columns=column_names(dataset), **kwargs)


def _formatted_column(value: Any, index: int, dataset_text_field: str) -> str:
    if isinstance(value, str):
        return dataset_text_field
    if isinstance(value, list):
        return "messages"
    raise DatasetFormatError(
        f"Row {index}: formatting_func returned a {type(value).__name__} ({value!r:.60}). Expected a string "
        "(the text to train on) or a list of {'role': ..., 'content': ...} messages. Fix: return one of these.",
        row=index,
    )


def tokenize_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    eos_token: str | None = None,
    dataset_text_field: str = "text",
    formatting_func: Callable[[dict[str, Any]], Any] | None = None,
    assistant_only_loss: bool = False,
    expected_kinds: Sequence[str] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> tuple[Any, TruncationStats]:
    """Check, tokenize and truncate a whole dataset; return it with its truncation statistics.

    Every row is validated before anything is tokenized (for an ``IterableDataset``, each
    row just before it is tokenized, as it streams). The original columns are removed: the
    result holds only the columns listed in this module's docstring.

    Args:
        dataset: A ``datasets.Dataset`` or ``datasets.IterableDataset`` in any supported format.
        tokenizer: A fast tokenizer; conversational data needs its chat template.
        max_length: Longest row kept, in tokens (``None``: no truncation). See :func:`truncate_row`.
        truncation_mode: ``"keep_start"`` drops the end of long rows, ``"keep_end"`` the beginning.
        eos_token: Token appended to standard texts and completions instead of the tokenizer's
            EOS (e.g. ``"<|endoftext|>"`` for a base model). Must be one token of the vocabulary.
        dataset_text_field: Name of the text column of standard language-modeling data.
        formatting_func: Optional ``row -> str`` or ``row -> list of messages`` applied first,
            for datasets whose columns fit no format (see :func:`apply_formatting_func`).
        assistant_only_loss: Also build ``assistant_masks`` (1 on assistant tokens) from the
            template's ``{% generation %}`` markers; conversational data only.
        expected_kinds: Accepted formats (see :func:`honelm.data.detect_format`).
        chat_template_kwargs: Extra variables for the chat template (e.g. ``enable_thinking``).
        num_proc: Worker processes for ``Dataset.map`` (not used for an ``IterableDataset``,
            which is tokenized lazily by whoever iterates it).
        batch_size: Rows per ``map`` batch; standard text is encoded a batch at a time.

    Returns:
        ``(tokenized_dataset, stats)``. For an ``IterableDataset`` nothing is tokenized yet:
        ``stats`` fills up as the result is iterated (``stats.complete`` is ``False``).
    """
    from datasets import IterableDataset

    _check_truncation(max_length, truncation_mode)
    streaming = isinstance(dataset, IterableDataset)
    if formatting_func is not None:
        dataset = apply_formatting_func(
            dataset, formatting_func, dataset_text_field=dataset_text_field, num_proc=num_proc
        )
    kinds = {"expected_kinds": expected_kinds, "dataset_text_field": dataset_text_field}
    fmt = detect_format(dataset, **kinds) if streaming else validate_dataset(dataset, batch_size=batch_size, **kinds)
    ctx = _make_context(
        tokenizer,
        fmt,
        eos_token=eos_token,
        assistant_only_loss=assistant_only_loss,
        chat_template_kwargs=chat_template_kwargs,
    )
    stats = TruncationStats(max_length=max_length, complete=not streaming)
    map_kwargs: dict[str, Any] = {"batched": True, "with_indices": True, "batch_size": batch_size}
    if streaming:
        function = _BatchTokenizer(fmt, ctx, max_length, truncation_mode, stats)
        return dataset.map(function, remove_columns=column_names(dataset), **map_kwargs), stats
    function = _BatchTokenizer(fmt, ctx, max_length, truncation_mode, None)
    plain = dataset.with_format(None)  # rows as Python objects, whatever format the caller set
    tokenized = plain.map(
        function, remove_columns=plain.column_names, num_proc=num_proc, desc="Tokenizing", **map_kwargs
    )
    _fill_stats(stats, tokenized.data.column(_DROPPED_COLUMN))
    return tokenized.remove_columns(_DROPPED_COLUMN), stats


def _fill_stats(stats: TruncationStats, dropped: Any) -> None:
    """Fill ``stats`` from the per-row counts (a pyarrow array), without a Python loop."""
    import pyarrow.compute as pc

    positive = pc.filter(dropped, pc.greater(dropped, 0))
    stats.num_rows = len(dropped)
    stats.num_truncated = len(positive)
    stats.tokens_dropped = int(pc.sum(positive).as_py() or 0)
    stats.max_tokens_dropped = int(pc.max(positive).as_py() or 0) if len(positive) else 0
