"""Packing: bin-packing quality, token conservation, mask alignment, errors."""

from __future__ import annotations

import math
import random

import pytest
from datasets import Dataset, IterableDataset

from honelm.data.packing import PACKING_STRATEGIES, best_fit_decreasing, pack_dataset

# --- reference algorithms ------------------------------------------------------------------


def _first_fit(lengths: list[int], capacity: int) -> int:
    """Number of bins naive first-fit (input order, first bin with room) uses."""
    loads: list[int] = []
    for length in lengths:
        for index, load in enumerate(loads):
            if load + length <= capacity:
                loads[index] += length
                break
        else:
            loads.append(length)
    return len(loads)


def _optimum(lengths: list[int], capacity: int) -> int:
    """Fewest bins, by exhaustive search (tiny inputs only)."""
    items = sorted(lengths, reverse=True)
    best = [len(items)]

    def place(i: int, loads: list[int]) -> None:
        if len(loads) >= best[0]:
            return
        if i == len(items):
            best[0] = len(loads)
            return
        tried = set()
        for b, load in enumerate(loads):
            if load + items[i] <= capacity and load not in tried:
                tried.add(load)
                loads[b] += items[i]
                place(i + 1, loads)
                loads[b] -= items[i]
        loads.append(items[i])
        place(i + 1, loads)
        loads.pop()

    place(0, [])
    return best[0]


def _check_bins(bins: list[list[int]], lengths: list[int], capacity: int) -> None:
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)


# --- best_fit_decreasing -------------------------------------------------------------------


def test_bfd_by_hand() -> None:
    # Longest first: 6 opens bin 0 (2 left), 5 opens bin 1 (3 left), 4 fits neither and opens
    # bin 2; 3 goes to the fullest bin with room (bin 1), 2 to bin 0.
    assert best_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]


def test_bfd_prefers_the_fullest_bin_that_fits() -> None:
    # 12 opens bin 0 (8 left), 9 opens bin 1 (11 left), the second 9 only fits bin 1 (2 left).
    # The 2 fits both: best fit puts it in bin 1 (exact fit), first fit would put it in bin 0.
    assert best_fit_decreasing([12, 9, 9, 2], 20) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("seed", range(20))
def test_bfd_at_least_as_tight_as_first_fit(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.randint(16, 256)
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    bins = best_fit_decreasing(lengths, capacity)
    _check_bins(bins, lengths, capacity)
    assert len(bins) <= _first_fit(lengths, capacity)
    assert len(bins) >= math.ceil(sum(lengths) / capacity)


def test_bfd_strictly_tighter_than_first_fit_on_a_mixed_sample() -> None:
    rng = random.Random(7)
    lengths = [rng.choice([rng.randint(1, 30), rng.randint(60, 100)]) for _ in range(500)]
    assert len(best_fit_decreasing(lengths, 128)) < _first_fit(lengths, 128)


@pytest.mark.parametrize("seed", range(30))
def test_bfd_optimal_when_sizes_divide_each_other(seed: int) -> None:
    # Sizes are powers of two dividing the capacity: every open bin's free space is a multiple
    # of the next (smaller or equal) item, so BFD only opens a bin when all are full.
    rng = random.Random(seed)
    capacity = 2 ** rng.randint(2, 5)
    lengths = [2 ** rng.randint(0, int(math.log2(capacity))) for _ in range(rng.randint(1, 9))]
    bins = best_fit_decreasing(lengths, capacity)
    _check_bins(bins, lengths, capacity)
    assert len(bins) == _optimum(lengths, capacity) == math.ceil(sum(lengths) / capacity)


@pytest.mark.parametrize("seed", range(30))
def test_bfd_optimal_when_all_items_exceed_a_third(seed: int) -> None:
    # With every item above capacity / 3 a bin holds at most two items; decreasing best fit
    # then finds an optimal pairing.
    rng = random.Random(seed)
    capacity = rng.randint(6, 40)
    lengths = [rng.randint(capacity // 3 + 1, capacity) for _ in range(rng.randint(1, 9))]
    bins = best_fit_decreasing(lengths, capacity)
    _check_bins(bins, lengths, capacity)
    assert len(bins) == _optimum(lengths, capacity)


def test_bfd_large_input_is_valid_and_near_the_lower_bound() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(20_000)]
    bins = best_fit_decreasing(lengths, 1024)
    _check_bins(bins, lengths, 1024)
    assert len(bins) <= math.ceil(sum(lengths) / 1024) + 1


def test_bfd_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="item 1 has length 9"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        best_fit_decreasing([1], 0)


# --- pack_dataset ----------------------------------------------------------------------------


def _rows(lengths: list[int], extra: bool = True) -> list[dict]:
    """Rows with globally unique token ids; the masks are functions of the token id, so a
    packed mask value is correct exactly when it stayed with its token."""
    rows, next_id = [], 100
    for length in lengths:
        ids = list(range(next_id, next_id + length))
        next_id += length
        row: dict = {"input_ids": ids, "completion_mask": [t % 2 for t in ids]}
        if extra:
            row["assistant_masks"] = [int(t % 3 == 0) for t in ids]
            row["text"] = f"row with {length} tokens"
        rows.append(row)
    return rows


LENGTHS = [5, 1, 9, 3, 12, 7, 2, 8, 4, 6, 11, 3]


def _check_packed_rows(packed: list[dict], seq_length: int) -> None:
    for row in packed:
        assert set(row) == {"input_ids", "completion_mask", "assistant_masks", "seq_lengths"}
        assert 0 < len(row["input_ids"]) <= seq_length
        assert sum(row["seq_lengths"]) == len(row["input_ids"])
        assert all(n >= 1 for n in row["seq_lengths"])
        assert row["completion_mask"] == [t % 2 for t in row["input_ids"]]
        assert row["assistant_masks"] == [int(t % 3 == 0) for t in row["input_ids"]]


def _pieces(row: dict) -> list[list[int]]:
    pieces, start = [], 0
    for n in row["seq_lengths"]:
        pieces.append(row["input_ids"][start : start + n])
        start += n
    return pieces


def test_bfd_truncates_overflow_and_keeps_whole_sequences() -> None:
    rows = _rows(LENGTHS)
    packed = list(pack_dataset(Dataset.from_list(rows), seq_length=8, strategy="bfd"))
    _check_packed_rows(packed, 8)
    pieces = sorted(p for row in packed for p in _pieces(row))
    assert pieces == sorted(row["input_ids"][:8] for row in rows)  # first 8 tokens, rest dropped
    assert len(packed) == len(best_fit_decreasing([min(n, 8) for n in LENGTHS], 8))


@pytest.mark.parametrize("strategy", ["bfd_split", "wrapped"])
def test_every_token_appears_exactly_once(strategy: str) -> None:
    rows = _rows(LENGTHS)
    packed = list(pack_dataset(Dataset.from_list(rows), seq_length=8, strategy=strategy))
    _check_packed_rows(packed, 8)
    all_ids = [t for row in rows for t in row["input_ids"]]
    packed_ids = [t for row in packed for t in row["input_ids"]]
    assert sorted(packed_ids) == sorted(all_ids) and len(packed_ids) == len(all_ids)
    # Each piece is a contiguous run of one original sequence (token ids are unique).
    origin = {t: (r, i) for r, row in enumerate(rows) for i, t in enumerate(row["input_ids"])}
    for row in packed:
        for piece in _pieces(row):
            r, i = origin[piece[0]]
            assert piece == rows[r]["input_ids"][i : i + len(piece)]


def test_bfd_split_cuts_long_sequences_into_full_pieces() -> None:
    rows = _rows([20, 3])
    packed = list(pack_dataset(Dataset.from_list(rows), seq_length=8, strategy="bfd_split"))
    pieces = sorted(p for row in packed for p in _pieces(row))
    ids = rows[0]["input_ids"]
    assert pieces == sorted([ids[:8], ids[8:16], ids[16:], rows[1]["input_ids"]])
    assert sorted(row["seq_lengths"] for row in packed) == [[4, 3], [8], [8]]


def test_wrapped_is_the_concatenation_cut_into_fixed_rows() -> None:
    rows = _rows(LENGTHS)
    packed = list(pack_dataset(Dataset.from_list(rows), seq_length=8, strategy="wrapped"))
    concatenation = [t for row in rows for t in row["input_ids"]]
    assert [t for row in packed for t in row["input_ids"]] == concatenation
    assert [len(row["input_ids"]) for row in packed[:-1]] == [8] * (len(packed) - 1)
    # Pieces end at the original sequence boundaries and at the row cuts (worked out by hand
    # from LENGTHS, cutting every 8 tokens).
    assert [row["seq_lengths"] for row in packed] == [
        [5, 1, 2], [7, 1], [2, 6], [6, 2], [5, 2, 1], [7, 1], [3, 5], [1, 7], [4, 3]
    ]


def test_packing_happens_within_each_map_batch() -> None:
    rows = _rows(LENGTHS)
    packed = list(
        pack_dataset(Dataset.from_list(rows), 16, "bfd", map_kwargs={"batch_size": 4})
    )
    batch_of = {t: i // 4 for i, row in enumerate(rows) for t in row["input_ids"]}
    for row in packed:
        assert len({batch_of[t] for t in row["input_ids"]}) == 1


@pytest.mark.parametrize("strategy", PACKING_STRATEGIES)
def test_iterable_dataset_packs_like_dataset(strategy: str) -> None:
    rows = _rows(LENGTHS)
    map_kwargs = {"batch_size": 5}
    expected = list(pack_dataset(Dataset.from_list(rows), 10, strategy, map_kwargs=map_kwargs))

    def generate():
        yield from rows

    iterable = IterableDataset.from_generator(generate)
    packed = pack_dataset(iterable, 10, strategy, map_kwargs=map_kwargs)
    assert isinstance(packed, IterableDataset)
    assert list(packed) == expected


def test_deterministic_and_other_columns_dropped() -> None:
    dataset = Dataset.from_list(_rows(LENGTHS))
    first = pack_dataset(dataset, 10)
    assert "text" not in first.column_names
    assert first.to_list() == pack_dataset(dataset, 10).to_list()


def test_explicit_columns_and_empty_sequences() -> None:
    rows = _rows([3, 0, 4])
    packed = pack_dataset(Dataset.from_list(rows), 8, columns=["completion_mask"]).to_list()
    assert packed == [
        {
            "input_ids": [103, 104, 105, 106, 100, 101, 102],
            "completion_mask": [1, 0, 1, 0, 0, 1, 0],
            "seq_lengths": [4, 3],
        }
    ]


def test_errors_name_the_problem() -> None:
    dataset = Dataset.from_list(_rows([3, 4]))
    with pytest.raises(ValueError, match="unknown strategy 'ffd'.*'bfd'"):
        pack_dataset(dataset, 8, strategy="ffd")
    with pytest.raises(ValueError, match="seq_length must be a positive int.*got 0"):
        pack_dataset(dataset, 0)
    with pytest.raises(ValueError, match="no 'input_ids' column.*Tokenize"):
        pack_dataset(Dataset.from_list([{"text": "hello"}]), 8)
    with pytest.raises(ValueError, match="already packed"):
        pack_dataset(pack_dataset(dataset, 8), 8)
    with pytest.raises(ValueError, match="may not set 'batched'"):
        pack_dataset(dataset, 8, map_kwargs={"batched": False})


def test_misaligned_mask_names_row_and_column() -> None:
    rows = _rows([3, 4, 5], extra=False)
    rows[2]["completion_mask"] = [1, 1]
    message = "row 2, column 'completion_mask' has 2 values but 'input_ids' has 5"
    with pytest.raises(ValueError, match=message) as info:
        pack_dataset(Dataset.from_list(rows), 8)
    assert (info.value.row, info.value.column) == (2, "completion_mask")
