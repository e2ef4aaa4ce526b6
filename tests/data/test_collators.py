"""DataCollatorForLanguageModeling: padded, padding-free and packed batches, by hand."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from honelm.data.collators import (
    DataCollatorForLanguageModeling,
    flash_attn_kwargs_from_lengths,
    position_ids_from_lengths,
)
from honelm.data.packing import pack_dataset

X = -100
PAD = 0


def _t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _assert_batch(batch: dict, expected: dict) -> None:
    assert set(batch) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert batch[key].dtype == value.dtype, key
            assert torch.equal(batch[key], value), f"{key}: {batch[key]} != {value}"
        else:
            assert batch[key] == value, key


EXAMPLES = [
    {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]},
    {"input_ids": [9, 10]},
]


def test_padded_batch_by_hand() -> None:
    batch = DataCollatorForLanguageModeling(PAD)(EXAMPLES)
    _assert_batch(
        batch,
        {
            "input_ids": _t([[5, 6, 7, 8], [9, 10, PAD, PAD]]),
            "attention_mask": _t([[1, 1, 1, 1], [1, 1, 0, 0]]),
            "labels": _t([[X, X, 7, 8], [X, 10, X, X]]),
            "position_ids": _t([[0, 1, 2, 3], [0, 1, 2, 3]]),
        },
    )


def test_completion_mask_ignored_when_completion_only_loss_is_off() -> None:
    batch = DataCollatorForLanguageModeling(PAD, completion_only_loss=False)(EXAMPLES[:1])
    assert batch["labels"].tolist() == [[X, 6, 7, 8]]


def test_assistant_only_loss_combines_with_completion_mask() -> None:
    example = {
        "input_ids": [1, 2, 3, 4, 5],
        "completion_mask": [0, 1, 1, 1, 1],
        "assistant_masks": [0, 0, 1, 0, 1],
    }
    collate = DataCollatorForLanguageModeling(PAD, assistant_only_loss=True)
    assert collate([example])["labels"].tolist() == [[X, X, 3, X, 5]]
    collate = DataCollatorForLanguageModeling(
        PAD, completion_only_loss=False, assistant_only_loss=True
    )
    assert collate([example])["labels"].tolist() == [[X, X, 3, X, 5]]
    example["assistant_masks"] = [1, 1, 1, 1, 0]
    assert collate([example])["labels"].tolist() == [[X, 2, 3, 4, X]]


def test_assistant_only_loss_without_masks_says_how_to_fix() -> None:
    collate = DataCollatorForLanguageModeling(PAD, assistant_only_loss=True)
    message = r"Example 1 has no 'assistant_masks'.*generation.*assistant_only_loss=False"
    with pytest.raises(ValueError, match=message):
        collate([{"input_ids": [1, 2], "assistant_masks": [1, 1]}, {"input_ids": [3, 4]}])


def test_padded_pad_to_multiple_of_and_no_position_ids() -> None:
    collate = DataCollatorForLanguageModeling(PAD, pad_to_multiple_of=3, return_position_ids=False)
    batch = collate(EXAMPLES)
    _assert_batch(
        batch,
        {
            "input_ids": _t([[5, 6, 7, 8, PAD, PAD], [9, 10, PAD, PAD, PAD, PAD]]),
            "attention_mask": _t([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]),
            "labels": _t([[X, X, 7, 8, X, X], [X, 10, X, X, X, X]]),
        },
    )


def test_padding_free_batch_by_hand() -> None:
    batch = DataCollatorForLanguageModeling(PAD, padding_free=True)(EXAMPLES)
    _assert_batch(
        batch,
        {
            "input_ids": _t([[5, 6, 7, 8, 9, 10]]),
            # 9 starts a sequence: it must not be the target of the prediction made at 8.
            "labels": _t([[X, X, 7, 8, X, 10]]),
            "position_ids": _t([[0, 1, 2, 3, 0, 1]]),
        },
    )


def test_padding_free_pad_to_multiple_of_pads_with_its_own_sequence() -> None:
    collate = DataCollatorForLanguageModeling(
        PAD, padding_free=True, pad_to_multiple_of=4, return_flash_attn_kwargs=True
    )
    batch = collate(EXAMPLES)
    _assert_batch(
        batch,
        {
            "input_ids": _t([[5, 6, 7, 8, 9, 10, PAD, PAD]]),
            "labels": _t([[X, X, 7, 8, X, 10, X, X]]),
            "position_ids": _t([[0, 1, 2, 3, 0, 1, 0, 1]]),
            "cu_seq_lens_q": torch.tensor([0, 4, 6, 8], dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor([0, 4, 6, 8], dtype=torch.int32),
            "max_length_q": 4,
            "max_length_k": 4,
        },
    )


def test_packed_rows_are_flattened_with_positions_restarting_inside_rows() -> None:
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "completion_mask": [0, 1, 1, 0, 1], "seq_lengths": [2, 3]},
        {"input_ids": [6, 7, 8], "completion_mask": [1, 1, 1], "seq_lengths": [3]},
    ]
    batch = DataCollatorForLanguageModeling(PAD)(rows)  # packed rows: padding-free without asking
    _assert_batch(
        batch,
        {
            "input_ids": _t([[1, 2, 3, 4, 5, 6, 7, 8]]),
            "labels": _t([[X, 2, X, X, 5, X, 7, 8]]),
            "position_ids": _t([[0, 1, 0, 1, 2, 0, 1, 2]]),
        },
    )


def test_flattened_labels_equal_padded_labels_without_padding() -> None:
    examples = [
        {"input_ids": list(range(10, 10 + n)), "completion_mask": [int(i >= 1) for i in range(n)]}
        for n in (4, 1, 7, 3)
    ]
    padded = DataCollatorForLanguageModeling(PAD)(examples)
    flat = DataCollatorForLanguageModeling(PAD, padding_free=True)(examples)
    keep = padded["attention_mask"].bool()
    assert torch.equal(padded["labels"][keep], flat["labels"][0])
    assert torch.equal(padded["input_ids"][keep], flat["input_ids"][0])
    assert torch.equal(padded["position_ids"][keep], flat["position_ids"][0])


def test_collates_a_packed_dataset_through_a_dataloader() -> None:
    rows = [
        {"input_ids": list(range(100 + 10 * i, 100 + 10 * i + n)), "completion_mask": [1] * n}
        for i, n in enumerate((3, 5, 2, 6))
    ]
    packed = pack_dataset(Dataset.from_list(rows), seq_length=8)
    collate = DataCollatorForLanguageModeling(PAD)
    loader = torch.utils.data.DataLoader(packed, batch_size=8, collate_fn=collate)
    (batch,) = list(loader)
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (1, n_tokens)
    assert batch["labels"].shape == batch["position_ids"].shape == (1, n_tokens)
    assert int((batch["position_ids"] == 0).sum()) == len(rows)  # one start per original sequence
    assert int((batch["labels"] == X).sum()) == len(rows)  # exactly the first token of each


def test_tensor_inputs_are_accepted() -> None:
    example = {"input_ids": torch.tensor([3, 4, 5]), "completion_mask": torch.tensor([0, 1, 1])}
    batch = DataCollatorForLanguageModeling(PAD)([example])
    assert batch["labels"].tolist() == [[X, 4, 5]]


def test_position_ids_and_flash_kwargs_helpers() -> None:
    assert position_ids_from_lengths([3, 1, 2]).tolist() == [0, 1, 2, 0, 0, 1]
    kwargs = flash_attn_kwargs_from_lengths([3, 1, 2])
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and kwargs["max_length_q"] == 3


def test_flash_kwargs_match_what_transformers_derives_from_position_ids() -> None:
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    examples = [{"input_ids": [1] * n} for n in (5, 2, 9, 1)]
    collate = DataCollatorForLanguageModeling(
        PAD, padding_free=True, pad_to_multiple_of=8, return_flash_attn_kwargs=True
    )
    batch = collate(examples)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q.to(torch.int32))
    assert torch.equal(batch["cu_seq_lens_k"], cu_k.to(torch.int32))
    assert batch["max_length_q"] == int(max_q) == 9 and batch["max_length_k"] == int(max_k)


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (
            [{"input_ids": [1, 2], "completion_mask": [1]}],
            r"Example 0: 'completion_mask' has 1 values but 'input_ids' has 2",
        ),
        ([{"input_ids": [1]}, {"text": "hi"}], r"Example 1 has no 'input_ids'"),
        (
            [{"input_ids": [1, 2, 3], "seq_lengths": [2, 2]}],
            r"Example 0: 'seq_lengths' \[2, 2\] must be positive and sum to the 3",
        ),
        ([], "empty list"),
    ],
)
def test_bad_examples_are_named(examples: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataCollatorForLanguageModeling(PAD)(examples)


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        DataCollatorForLanguageModeling(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_to_multiple_of must be None or >= 1"):
        DataCollatorForLanguageModeling(PAD, pad_to_multiple_of=0)
