"""Collating tokenized examples into model-ready batches, padded or padding-free.

Label convention. ``labels`` has one entry per input token and holds the token the model
must predict *at the previous position*: the causal-LM loss in transformers (and in
:mod:`honelm.ops`) shifts internally, so the logits at position ``t`` are scored against
``labels[t + 1]``. The first token of every sequence has nothing before it in its own
sequence, so its label is always ``ignore_index``. In a padding-free or packed row this is
what stops the last token of one sequence from being trained to predict the first token of
the next one. Setting it in padded batches too changes no loss (the first label is never
scored there) and makes a padded and a flattened batch carry exactly the same labels, so
counting ``labels != ignore_index`` counts the scored tokens in both.

Padding-free batches. With ``padding_free=True``, or when the examples are packed rows
(they have a ``seq_lengths`` column from :func:`honelm.data.packing.pack_dataset`), all
sequences are concatenated into a single row of shape ``(1, N)`` and ``position_ids``
restart at 0 at every sequence. No ``attention_mask`` is returned: transformers then detects
the sequence boundaries from the restarting position ids and builds a block-diagonal causal
mask (``sdpa``, ``eager``), or calls the variable-length flash-attention kernel
(``flash_attention_2``/``3``); attention never crosses from one sequence into another.
``return_flash_attn_kwargs=True`` also returns the ``cu_seq_lens_q``/``cu_seq_lens_k``
(cumulative sequence starts, ``int32``) and ``max_length_q``/``max_length_k`` (``int``)
that the flash-attention path would otherwise derive from the position ids.

Run the forward pass of a flattened batch with ``use_cache=False``. When the model builds
a KV cache (``use_cache`` defaults to ``config.use_cache``, usually ``True``), transformers
does not look for sequence boundaries in the position ids and attention crosses them.
``transformers.Trainer`` sets ``model.config.use_cache`` from ``TrainingArguments.use_cache``
(``False`` by default) for the model it trains; any other model (a frozen reference or
teacher model, a manual forward) needs ``use_cache=False`` in the call.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def _round_up(length: int, multiple: int | None) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (unchanged when ``None``)."""
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def _per_token(
    example: Mapping[str, Any], column: str, index: int, n_tokens: int
) -> list[int] | None:
    """``example[column]`` as a list, checked to hold one value per token (``None`` if absent)."""
    values = example.get(column)
    if values is None:
        return None
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != n_tokens:
        raise ValueError(
            f"Example {index}: {column!r} has {len(values)} values but 'input_ids' has {n_tokens} "
            f"tokens; it must have one 0/1 value per token. Check how the example was tokenized."
        )
    return values


def _sequence_lengths(example: Mapping[str, Any], index: int, n_tokens: int) -> list[int]:
    """The lengths of the sequences in an example: its ``seq_lengths``, or one sequence."""
    seq_lengths = example.get("seq_lengths")
    if seq_lengths is None:
        return [n_tokens] if n_tokens > 0 else []
    seq_lengths = [int(n) for n in seq_lengths]
    if sum(seq_lengths) != n_tokens or any(n < 1 for n in seq_lengths):
        raise ValueError(
            f"Example {index}: 'seq_lengths' {seq_lengths} must be positive and sum to the "
            f"{n_tokens} tokens of 'input_ids'. Rebuild the packed dataset with pack_dataset."
        )
    return seq_lengths


def position_ids_from_lengths(seq_lengths: Sequence[int]) -> torch.Tensor:
    """Position ids that restart at 0 at each sequence: ``[3, 2] -> [0, 1, 2, 0, 1]``."""
    lengths = torch.as_tensor(list(seq_lengths), dtype=torch.long)  # (S,)
    starts = torch.cumsum(lengths, 0) - lengths  # (S,)
    total = int(lengths.sum())
    return torch.arange(total, dtype=torch.long) - torch.repeat_interleave(starts, lengths)  # (N,)


def flash_attn_kwargs_from_lengths(seq_lengths: Sequence[int]) -> dict[str, Any]:
    """The variable-length flash-attention kwargs of a row holding ``seq_lengths`` sequences.

    Returns ``cu_seq_lens_q``/``cu_seq_lens_k`` (``int32``, shape ``(S + 1,)``: 0 then the
    cumulative lengths) and ``max_length_q``/``max_length_k`` (the longest sequence, ``int``),
    the keyword names transformers' flash-attention integration accepts.
    """
    lengths = torch.as_tensor(list(seq_lengths), dtype=torch.int32)  # (S,)
    cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)  # (S + 1,)
    cu_seq_lens[1:] = torch.cumsum(lengths, 0)
    max_length = int(lengths.max()) if len(lengths) else 0
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens.clone(),
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


@dataclass
class DataCollatorForLanguageModeling:
    """Batch tokenized examples for causal-LM training, padded or padding-free.

    Each example is a mapping with ``input_ids`` and optionally ``completion_mask`` and
    ``assistant_masks`` (one 0/1 value per token, 1 = train on this token) and
    ``seq_lengths`` (a packed row). See the module docstring for the label convention.

    Args:
        pad_token_id: Token id used for padding.
        completion_only_loss: When an example has a ``completion_mask``, compute the loss
            only on its completion tokens (prompt labels become ``ignore_index``).
        assistant_only_loss: Compute the loss only on tokens whose ``assistant_masks`` is 1.
            Every example must then have ``assistant_masks``.
        padding_free: Concatenate all examples into one ``(1, N)`` row with restarting
            ``position_ids`` and no ``attention_mask``. Packed rows are always collated so.
        pad_to_multiple_of: Pad the length ``T`` (padded) or ``N`` (padding-free) up to a
            multiple of this. Padding-free padding forms its own sequence, fully ignored.
        return_position_ids: Return ``position_ids`` in padded mode (they are always
            returned in padding-free mode, where correctness depends on them).
        return_flash_attn_kwargs: In padding-free mode, also return ``cu_seq_lens_q``,
            ``cu_seq_lens_k``, ``max_length_q`` and ``max_length_k``.
        ignore_index: Label value that the loss skips.

    Returns (when called on a list of examples):
        Padded: ``input_ids``, ``attention_mask``, ``labels`` and ``position_ids``, each a
        ``(B, T)`` long tensor, right-padded. Padding-free: ``input_ids``, ``labels`` and
        ``position_ids``, each ``(1, N)``.
    """

    pad_token_id: int
    completion_only_loss: bool = True
    assistant_only_loss: bool = False
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    return_position_ids: bool = True
    return_flash_attn_kwargs: bool = False
    ignore_index: int = -100

    def __post_init__(self) -> None:
        pad = self.pad_token_id
        if not isinstance(pad, numbers.Integral) or isinstance(pad, bool):
            raise ValueError(
                f"DataCollatorForLanguageModeling: pad_token_id must be an int, got {pad!r}. "
                "Use tokenizer.pad_token_id (set tokenizer.pad_token first if it is None)."
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"DataCollatorForLanguageModeling: pad_to_multiple_of must be None or >= 1, "
                f"got {self.pad_to_multiple_of}."
            )

    def labels_for(self, example: Mapping[str, Any], index: int = 0) -> list[int]:
        """The labels of one example (see the module docstring for the convention)."""
        input_ids = [int(t) for t in example["input_ids"]]
        labels = list(input_ids)
        completion_mask = _per_token(example, "completion_mask", index, len(input_ids))
        if self.completion_only_loss and completion_mask is not None:
            labels = [t if m else self.ignore_index for t, m in zip(labels, completion_mask)]
        if self.assistant_only_loss:
            assistant_masks = _per_token(example, "assistant_masks", index, len(input_ids))
            if assistant_masks is None:
                raise ValueError(
                    f"Example {index} has no 'assistant_masks', which assistant_only_loss=True "
                    "needs. Tokenize conversations with assistant masks (a chat template that "
                    "marks assistant turns with {% generation %}, and "
                    "return_assistant_tokens_mask=True), or set assistant_only_loss=False."
                )
            labels = [t if m else self.ignore_index for t, m in zip(labels, assistant_masks)]
        start = 0
        for length in _sequence_lengths(example, index, len(input_ids)):
            labels[start] = self.ignore_index  # nothing in this sequence precedes it
            start += length
        return labels

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``examples`` into a batch of tensors (see the class docstring)."""
        if len(examples) == 0:
            raise ValueError("DataCollatorForLanguageModeling: got an empty list of examples.")
        for index, example in enumerate(examples):
            if "input_ids" not in example:
                raise ValueError(
                    f"Example {index} has no 'input_ids' (found keys {sorted(example)}). "
                    "Tokenize the dataset before collating."
                )
        packed = any(example.get("seq_lengths") is not None for example in examples)
        if self.padding_free or packed:
            return self._collate_flat(examples)
        return self._collate_padded(examples)

    def _collate_padded(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        lengths = [len(example["input_ids"]) for example in examples]
        batch_size, width = len(examples), _round_up(max(lengths), self.pad_to_multiple_of)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)  # (B, T)
        labels = torch.full((batch_size, width), self.ignore_index, dtype=torch.long)  # (B, T)
        for row, (example, length) in enumerate(zip(examples, lengths)):
            input_ids[row, :length] = torch.as_tensor(list(example["input_ids"]), dtype=torch.long)
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.as_tensor(self.labels_for(example, row), dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        if self.return_position_ids:
            positions = torch.arange(width, dtype=torch.long)  # (T,)
            batch["position_ids"] = positions.expand(batch_size, width).clone()  # (B, T)
        return batch

    def _collate_flat(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        input_ids: list[int] = []
        labels: list[int] = []
        seq_lengths: list[int] = []
        for index, example in enumerate(examples):
            input_ids.extend(int(t) for t in example["input_ids"])
            labels.extend(self.labels_for(example, index))
            seq_lengths.extend(_sequence_lengths(example, index, len(example["input_ids"])))
        n_pad = _round_up(len(input_ids), self.pad_to_multiple_of) - len(input_ids)
        if n_pad:  # the padding is one more sequence, so that no real token attends to it
            input_ids.extend([self.pad_token_id] * n_pad)
            labels.extend([self.ignore_index] * n_pad)
            seq_lengths.append(n_pad)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),  # (1, N)
            "labels": torch.tensor([labels], dtype=torch.long),  # (1, N)
            "position_ids": position_ids_from_lengths(seq_lengths).unsqueeze(0),  # (1, N)
        }
        if self.return_flash_attn_kwargs:
            batch.update(flash_attn_kwargs_from_lengths(seq_lengths))
        return batch
