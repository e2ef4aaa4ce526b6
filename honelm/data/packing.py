"""Packing tokenized rows into rows of a fixed token budget.

Packing puts several tokenized sequences into one row so that a batch carries no padding.
Each packed row records the lengths of the sequences it holds in a ``seq_lengths`` column;
:class:`honelm.data.collators.DataCollatorForLanguageModeling` turns them into position ids
that restart at 0 at every sequence, which is what keeps attention (and the loss) from
crossing from one sequence into the next.

Strategies (:data:`PACKING_STRATEGIES`):

- ``"bfd"``: best-fit-decreasing bin packing of whole sequences into rows of at most
  ``seq_length`` tokens. A sequence longer than ``seq_length`` keeps its first
  ``seq_length`` tokens; the rest is dropped.
- ``"bfd_split"``: as ``"bfd"``, but a long sequence is cut into pieces of ``seq_length``
  tokens (the last piece shorter) and every piece is packed: no token is dropped.
- ``"wrapped"``: all sequences are concatenated and cut into rows of exactly
  ``seq_length`` tokens (the last row of each map batch may be shorter). A sequence may
  continue from one row into the next; ``seq_lengths`` records the piece in each row.

Packing runs in a batched ``map``: sequences are packed together only within one map batch
(``map_kwargs={"batch_size": ...}``, 1000 rows by default). A larger batch packs more tightly
and uses more memory. With ``num_proc``, each process packs its own contiguous shard, so
the batch boundaries depend on ``num_proc`` too. The result is deterministic: it depends
only on the rows, their order and these two settings.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

from .errors import DatasetFormatError

PACKING_STRATEGIES: tuple[str, ...] = ("bfd", "bfd_split", "wrapped")
"""The names accepted by :func:`pack_dataset`'s ``strategy``."""

_DEFAULT_BATCH_SIZE = 1000
# map arguments that packing sets itself; a caller's value would silently break it.
_RESERVED_MAP_KWARGS = ("function", "batched", "with_indices", "remove_columns", "input_columns")


class _FreeSpaceIndex:
    """Open bins grouped by remaining capacity, with "smallest capacity >= n" in O(log C).

    A Fenwick tree over capacities ``1..capacity`` counts the bins having each remaining
    capacity; ``_stacks[c]`` holds the ids of those bins. Full bins are not tracked.
    """

    def __init__(self, capacity: int) -> None:
        self._size = capacity
        self._tree = [0] * (capacity + 1)
        self._stacks: list[list[int]] = [[] for _ in range(capacity + 1)]
        self._count = 0
        self._top_bit = 1 << (capacity.bit_length() - 1)

    def _add(self, value: int, delta: int) -> None:
        tree, size = self._tree, self._size
        while value <= size:
            tree[value] += delta
            value += value & -value

    def _count_at_most(self, value: int) -> int:
        tree, total = self._tree, 0
        while value > 0:
            total += tree[value]
            value -= value & -value
        return total

    def push(self, bin_id: int, remaining: int) -> None:
        """Record that ``bin_id`` has ``remaining`` free tokens (ignored when 0)."""
        if remaining > 0:
            self._stacks[remaining].append(bin_id)
            self._add(remaining, 1)
            self._count += 1

    def pop_best_fit(self, needed: int) -> tuple[int, int] | None:
        """Remove and return ``(bin_id, remaining)`` of the fullest bin with room for ``needed``."""
        rank = self._count_at_most(needed - 1) + 1  # the first bin with capacity >= needed
        if rank > self._count:
            return None
        tree, position, step = self._tree, 0, self._top_bit
        while step:  # Fenwick descent: the smallest capacity whose prefix count reaches rank
            nxt = position + step
            if nxt <= self._size and tree[nxt] < rank:
                position = nxt
                rank -= tree[nxt]
            step >>= 1
        remaining = position + 1
        bin_id = self._stacks[remaining].pop()
        self._add(remaining, -1)
        self._count -= 1
        return bin_id, remaining


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into as few bins of size ``capacity`` as best-fit-decreasing finds.

    Items are taken longest first (ties in input order); each goes into the open bin with
    the least free space that still fits it, or into a new bin. O(n log n + n log capacity).

    Args:
        lengths: Item sizes, each in ``[1, capacity]``.
        capacity: Bin size.

    Returns:
        For each bin, in the order the bins were opened, the indices of its items in the
        order they were placed.
    """
    if capacity < 1:
        raise ValueError(f"best_fit_decreasing: capacity must be >= 1, got {capacity}.")
    for index, length in enumerate(lengths):
        if not 1 <= length <= capacity:
            raise ValueError(
                f"best_fit_decreasing: item {index} has length {length}; every length must be "
                f"between 1 and the capacity {capacity}. Truncate or split long items first."
            )
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: deterministic
    free = _FreeSpaceIndex(capacity)
    bins: list[list[int]] = []
    for item in order:
        length = lengths[item]
        found = free.pop_best_fit(length) if length < capacity else None
        if found is None:
            bin_id, remaining = len(bins), capacity
            bins.append([])
        else:
            bin_id, remaining = found
        bins[bin_id].append(item)
        free.push(bin_id, remaining - length)
    return bins


def _check_batch(batch: dict[str, list], indices: list[int], columns: Sequence[str]) -> None:
    """Raise if a per-token column is not aligned with ``input_ids`` in some row."""
    for column in columns:
        if column not in batch:
            raise DatasetFormatError(
                f"pack_dataset: column {column!r} is missing from rows "
                f"{indices[0]}..{indices[-1]}. "
                "Every row must have the same columns; pass columns=[...] to choose them.",
                row=indices[0],
                column=column,
            )
        for index, ids, values in zip(indices, batch["input_ids"], batch[column]):
            if values is None or len(values) != len(ids):
                found = "None" if values is None else f"{len(values)} values"
                raise DatasetFormatError(
                    f"pack_dataset: row {index}, column {column!r} has {found} but 'input_ids' has "
                    f"{len(ids)} tokens; a per-token column must have one value per token. Fix the "
                    f"tokenization, or remove the column before packing, or pass columns=[...] "
                    f"listing only the per-token columns.",
                    row=index,
                    column=column,
                )


def _gather(
    values: list[list[Any]], pieces: list[tuple[int, int, int]], members: list[int]
) -> list[Any]:
    """Concatenate the token slices ``values[row][start:end]`` of the pieces in ``members``."""
    return list(
        itertools.chain.from_iterable(
            values[pieces[m][0]][pieces[m][1] : pieces[m][2]] for m in members
        )
    )


def _pack_bfd_batch(
    batch: dict[str, list], indices: list[int], seq_length: int, columns: Sequence[str], split: bool
) -> dict[str, list]:
    """Best-fit-decreasing packing of one map batch (``split``: keep the overflow as pieces)."""
    _check_batch(batch, indices, columns)
    pieces: list[tuple[int, int, int]] = []  # (row in batch, start, end)
    for row, ids in enumerate(batch["input_ids"]):
        if split:
            starts: Sequence[int] = range(0, len(ids), seq_length)
        else:
            starts = [0] if len(ids) > 0 else []
        pieces.extend((row, start, min(start + seq_length, len(ids))) for start in starts)
    lengths = [end - start for _, start, end in pieces]
    bins = best_fit_decreasing(lengths, seq_length)
    packed: dict[str, list] = {column: [] for column in columns}
    for members in bins:
        for column in columns:
            packed[column].append(_gather(batch[column], pieces, members))
    packed["seq_lengths"] = [[lengths[m] for m in members] for members in bins]
    return packed


def _pack_wrapped_batch(
    batch: dict[str, list], indices: list[int], seq_length: int, columns: Sequence[str]
) -> dict[str, list]:
    """Concatenate one map batch and cut it into rows of ``seq_length`` tokens."""
    _check_batch(batch, indices, columns)
    flat = {column: list(itertools.chain.from_iterable(batch[column])) for column in columns}
    total = len(flat["input_ids"])
    seq_lengths: list[list[int]] = [[]]
    fill = 0
    for length in map(len, batch["input_ids"]):
        while length > 0:
            take = min(seq_length - fill, length)
            seq_lengths[-1].append(take)
            fill, length = fill + take, length - take
            if fill == seq_length:
                seq_lengths.append([])
                fill = 0
    if not seq_lengths[-1]:
        seq_lengths.pop()
    packed = {
        column: [values[start : start + seq_length] for start in range(0, total, seq_length)]
        for column, values in flat.items()
    }
    packed["seq_lengths"] = seq_lengths
    return packed


def _first_row(dataset: Any) -> dict[str, Any] | None:
    """The first row of a ``Dataset`` or ``IterableDataset`` (``None`` when empty)."""
    if hasattr(dataset, "__len__"):
        return dataset[0] if len(dataset) > 0 else None
    return next(iter(dataset), None)


def _token_columns(first: dict[str, Any]) -> list[str]:
    """Columns that hold one number per token in ``first`` (``input_ids`` first)."""
    n_tokens = len(first["input_ids"])
    columns = ["input_ids"]
    for name, value in first.items():
        if name in ("input_ids", "seq_lengths") or not isinstance(value, (list, tuple)):
            continue
        if len(value) == n_tokens and all(isinstance(v, (int, float, bool)) for v in value):
            columns.append(name)
    return columns


def _validate(seq_length: int, strategy: str, first: dict[str, Any] | None) -> None:
    """Raise on a bad strategy or ``seq_length``, or rows that cannot be packed."""
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(
            f"pack_dataset: unknown strategy {strategy!r}. Choose one of {PACKING_STRATEGIES}: "
            "'bfd' (whole sequences, overflow truncated), 'bfd_split' (overflow packed as extra "
            "pieces) or 'wrapped' (concatenate and cut)."
        )
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(
            "pack_dataset: seq_length must be a positive int (tokens per packed row), "
            f"got {seq_length!r}."
        )
    if first is not None and "input_ids" not in first:
        raise DatasetFormatError(
            f"pack_dataset: rows have no 'input_ids' column (found columns {sorted(first)}). "
            "Tokenize the dataset first; packing works on token ids.",
            column="input_ids",
        )
    if first is not None and "seq_lengths" in first:
        raise DatasetFormatError(
            "pack_dataset: the rows already have a 'seq_lengths' column, so the dataset is "
            "already packed. Pack the unpacked, tokenized dataset instead.",
            column="seq_lengths",
        )


def pack_dataset(
    dataset: Any,
    seq_length: int,
    strategy: str = "bfd",
    map_kwargs: dict[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
) -> Any:
    """Pack a tokenized dataset into rows of at most ``seq_length`` tokens.

    Args:
        dataset: A ``datasets.Dataset`` or ``datasets.IterableDataset`` with an
            ``input_ids`` column (a list of token ids per row).
        seq_length: Token budget of a packed row.
        strategy: One of :data:`PACKING_STRATEGIES` (see the module docstring).
        map_kwargs: Extra arguments for ``dataset.map`` (``batch_size``, ``num_proc``,
            ``desc``, ...). Sequences are packed together only within one map batch.
        columns: The per-token columns to pack alongside ``input_ids``. By default, every
            column whose first row holds one number per token (``completion_mask``,
            ``assistant_masks``, ...). Other columns are dropped: a packed row mixes
            several original rows.

    Returns:
        A dataset of the same kind whose rows hold the packed per-token columns and
        ``seq_lengths``, the lengths of the sequences (or sequence pieces) in the row,
        in order; they sum to the row's length. Empty sequences are skipped; an empty
        dataset is returned unchanged.
    """
    first = _first_row(dataset)
    _validate(seq_length, strategy, first)
    if first is None:
        return dataset
    if columns is None:
        token_columns = _token_columns(first)
    else:
        token_columns = ["input_ids"] + [c for c in columns if c != "input_ids"]
    if strategy == "wrapped":
        function = functools.partial(
            _pack_wrapped_batch, seq_length=seq_length, columns=token_columns
        )
    else:
        split = strategy == "bfd_split"
        function = functools.partial(
            _pack_bfd_batch, seq_length=seq_length, columns=token_columns, split=split
        )
    kwargs: dict[str, Any] = {"batch_size": _DEFAULT_BATCH_SIZE}
    if hasattr(dataset, "__len__"):  # only Dataset.map knows these
        kwargs["desc"] = f"Packing ({strategy}, {seq_length} tokens)"
    for key, value in (map_kwargs or {}).items():
        if key in _RESERVED_MAP_KWARGS:
            raise ValueError(
                f"pack_dataset: map_kwargs may not set {key!r}; packing sets it itself. "
                "Pass only options such as batch_size, num_proc or desc."
            )
        kwargs[key] = value
    return dataset.map(
        function, batched=True, with_indices=True, remove_columns=list(first), **kwargs
    )
