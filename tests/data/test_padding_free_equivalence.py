"""Padded, padding-free and packed batches train exactly like one sequence at a time.

For each model family and attention implementation, the per-sequence loss (sum of the
token NLLs of one original sequence) and the gradient of the total loss with respect to
every parameter must match running the sequences one by one. Losses are computed here from
the logits (log_softmax + gather at the label positions), so they can be split by sequence.

Two negative controls show the test can fail: position ids that do not restart let
attention cross sequences, and labels that are not ignored at sequence starts train the
last token of a sequence to predict the first token of the next one.
"""

from __future__ import annotations

import pytest
import torch

from honelm.data.collators import DataCollatorForLanguageModeling
from honelm.data.packing import pack_dataset
from honelm.testing import tiny_model

IGNORE = -100
LENGTHS = (7, 3, 12, 5, 9)


def _examples(vocab_size: int, pad_token_id: int) -> list[dict[str, list[int]]]:
    """Distinct random sequences; some have a prompt part that the completion mask excludes."""
    generator = torch.Generator().manual_seed(1234)
    examples = []
    for index, length in enumerate(LENGTHS):
        ids = torch.randint(0, vocab_size, (length,), generator=generator)
        ids[ids == pad_token_id] = pad_token_id + 1
        n_prompt = length // 2 if index % 2 == 0 else 0
        completion_mask = [0] * n_prompt + [1] * (length - n_prompt)
        examples.append({"input_ids": ids.tolist(), "completion_mask": completion_mask})
    return examples


def _sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """For a flattened row, the index of the sequence each position belongs to."""
    return torch.cumsum((position_ids == 0).long(), dim=-1) - 1  # (N,)


def _token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """NLL of each label under the model, at the label's own position (0 where ignored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    scored = targets != IGNORE
    target_logps = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    nll = torch.where(scored, -target_logps, torch.zeros_like(target_logps))
    return torch.nn.functional.pad(nll, (1, 0))  # (B, T): nll[:, t] scores labels[:, t]


def _flat_sequence_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> dict[tuple, torch.Tensor]:
    """Per-sequence summed NLL of a ``(1, N)`` batch, keyed by the sequence's token ids."""
    nll = _token_nll(model, batch)[0]  # (N,)
    seq_ids = _sequence_ids(batch["position_ids"][0])  # (N,)
    n_seq = int(seq_ids.max()) + 1
    sums = torch.zeros(n_seq, dtype=nll.dtype).index_add(0, seq_ids, nll)  # (S,)
    ids = batch["input_ids"][0]
    return {tuple(ids[seq_ids == s].tolist()): sums[s] for s in range(n_seq)}


def _losses_and_grads(
    model: torch.nn.Module, losses: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The per-sequence losses and the gradient of their sum w.r.t. every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(torch.stack(losses).sum(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return torch.stack(losses).detach(), grads


def _reference(model: torch.nn.Module, examples: list[dict]) -> tuple[torch.Tensor, list]:
    """One sequence per forward pass, no padding, no collator: the NLL of each completion
    token given the tokens before it in its own sequence."""
    losses = []
    for example in examples:
        ids = torch.tensor([example["input_ids"]])  # (1, L)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # (L-1, V)
        target_logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        scored = torch.tensor(example["completion_mask"][1:], dtype=torch.bool)  # (L-1,)
        losses.append(-(target_logps * scored).sum())
    return _losses_and_grads(model, losses)


def _padded(model: torch.nn.Module, collator, examples: list[dict]) -> tuple:
    batch = collator(examples)
    assert "attention_mask" in batch and batch["input_ids"].shape[0] == len(examples)
    return _losses_and_grads(model, list(_token_nll(model, batch).sum(dim=1)))


def _keyed(model: torch.nn.Module, batch: dict, examples: list[dict]) -> tuple:
    by_ids = _flat_sequence_losses(model, batch)
    return _losses_and_grads(model, [by_ids[tuple(example["input_ids"])] for example in examples])


def _padding_free(model: torch.nn.Module, collator, examples: list[dict]) -> tuple:
    flat_collator = DataCollatorForLanguageModeling(
        collator.pad_token_id, padding_free=True, pad_to_multiple_of=collator.pad_to_multiple_of
    )
    batch = flat_collator(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    return _keyed(model, batch, examples)


def _packed(model: torch.nn.Module, collator, examples: list[dict]) -> tuple:
    from datasets import Dataset

    packed = pack_dataset(Dataset.from_list(examples), seq_length=16, strategy="bfd")
    assert len(packed) < len(examples)  # several sequences really share rows
    assert any(len(row["seq_lengths"]) > 1 for row in packed)
    batch = collator(list(packed))
    return _keyed(model, batch, examples)


def _assert_same(result: tuple, reference: tuple, what: str) -> None:
    (losses, grads), (ref_losses, ref_grads) = result, reference
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=f"{what}: losses")
    for index, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        scale = ref_grad.abs().max().clamp(min=1e-8)
        torch.testing.assert_close(
            grad / scale, ref_grad / scale, rtol=1e-5, atol=1e-5, msg=f"{what}: gradient {index}"
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen2_moe"])
def test_padded_padding_free_and_packed_match_one_by_one(arch: str, attn: str) -> None:
    model, tokenizer = tiny_model(arch, attn_implementation=attn)
    examples = _examples(len(tokenizer), tokenizer.pad_token_id)
    collator = DataCollatorForLanguageModeling(tokenizer.pad_token_id, pad_to_multiple_of=8)
    reference = _reference(model, examples)
    assert (reference[0] > 0).all()
    _assert_same(_padded(model, collator, examples), reference, "padded")
    _assert_same(_padding_free(model, collator, examples), reference, "padding-free")
    _assert_same(_packed(model, collator, examples), reference, "packed")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_negative_control_positions_that_do_not_restart_cross_sequences(attn: str) -> None:
    model, tokenizer = tiny_model("qwen2", attn_implementation=attn)
    examples = _examples(len(tokenizer), tokenizer.pad_token_id)
    collator = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)
    reference = _reference(model, examples)[0]
    batch = collator(examples)
    good = _flat_sequence_losses(model, batch)
    batch_arange = dict(batch, position_ids=torch.arange(sum(LENGTHS)).unsqueeze(0))  # (1, N)
    nll = _token_nll(model, batch_arange)[0].detach()  # (N,)
    seq_ids = _sequence_ids(batch["position_ids"][0])  # the true sequences, for splitting
    bad = torch.zeros(len(examples)).index_add(0, seq_ids, nll)
    good_losses = torch.stack([good[tuple(e["input_ids"])] for e in examples]).detach()
    torch.testing.assert_close(good_losses, reference, rtol=1e-5, atol=1e-6)
    # The first sequence sees nothing before it either way; every later one must differ.
    assert torch.allclose(bad[0], reference[0], rtol=1e-5)
    assert ((bad[1:] - reference[1:]).abs() > 1e-3).all()


def test_negative_control_labels_at_sequence_starts_leak_across_sequences() -> None:
    model, tokenizer = tiny_model("qwen2")
    examples = _examples(len(tokenizer), tokenizer.pad_token_id)
    examples = [dict(e, completion_mask=[1] * len(e["input_ids"])) for e in examples]
    collator = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)
    reference = _reference(model, examples)[0]
    batch = collator(examples)
    leaky = dict(batch, labels=batch["input_ids"].clone())  # no ignore_index at sequence starts
    losses = _flat_sequence_losses(model, leaky)
    leaky_losses = torch.stack([losses[tuple(e["input_ids"])] for e in examples]).detach()
    torch.testing.assert_close(leaky_losses[0], reference[0], rtol=1e-5, atol=1e-6)
    # Each later sequence is charged for predicting its first token from the previous sequence.
    assert (leaky_losses[1:] > reference[1:] + 1e-3).all()


def test_model_loss_with_internal_shift_matches_padded_batch() -> None:
    """transformers' causal-LM loss (it shifts labels) agrees on padded and flattened batches."""
    model, tokenizer = tiny_model("llama")
    examples = _examples(len(tokenizer), tokenizer.pad_token_id)
    padded = DataCollatorForLanguageModeling(tokenizer.pad_token_id)(examples)
    flat = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)(examples)
    assert int((padded["labels"] != IGNORE).sum()) == int((flat["labels"] != IGNORE).sum())
    loss_padded = model(**padded, use_cache=False).loss
    loss_flat = model(**flat, use_cache=False).loss
    torch.testing.assert_close(loss_flat, loss_padded, rtol=1e-5, atol=1e-6)
    n_scored = int((padded["labels"] != IGNORE).sum())
    expected = _token_nll(model, padded).sum() / n_scored
    torch.testing.assert_close(loss_padded, expected, rtol=1e-5, atol=1e-6)
