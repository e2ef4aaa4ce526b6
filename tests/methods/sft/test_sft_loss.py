"""SFT losses against a naive full-logits reference, values and gradients."""

from __future__ import annotations

import pytest
import torch

from honelm.methods.sft.loss import dft_loss, nll_loss


def _inputs(seed=0, B=3, T=7, H=16, V=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    labels[:, 0] = -100  # first token of every sequence is never a target
    return hidden, weight, b, labels


def _naive_token_logps(hidden, weight, bias, labels):
    logits = hidden[:, :-1] @ weight.T + (bias if bias is not None else 0)  # (B, T-1, V)
    logps = torch.log_softmax(logits.float(), -1)
    targets = labels[:, 1:]
    mask = targets != -100
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked, mask, logits


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 11, 40.0])
def test_nll_matches_naive(bias, num_items):
    hidden, weight, b, labels = _inputs(bias=bias)
    picked, mask, _ = _naive_token_logps(hidden, weight, b, labels)
    denom = mask.sum() if num_items is None else num_items
    expected = -(picked * mask).sum() / denom
    loss, stats = nll_loss(hidden, weight, labels, b, num_items)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(loss, hidden, weight, b), _grads(expected, hidden, weight, b)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert stats["num_tokens"].item() == mask.sum().item()


def test_nll_stats_count_accuracy_and_entropy():
    hidden, weight, b, labels = _inputs(seed=1)
    picked, mask, logits = _naive_token_logps(hidden, weight, b, labels)
    _, stats = nll_loss(hidden, weight, labels)
    correct = ((logits.argmax(-1) == labels[:, 1:]) & mask).sum()
    probs = torch.softmax(logits, -1)
    entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    assert stats["num_correct"].item() == correct.item()
    torch.testing.assert_close(stats["entropy_sum"], (entropy * mask).sum().detach(), rtol=1e-5, atol=1e-5)


def test_nll_by_hand_two_tokens():
    # Vocabulary of 2, logits [0, ln 3] -> p = [1/4, 3/4]. Targets 1 then 0.
    hidden = torch.tensor([[[1.0], [1.0], [0.0]]], requires_grad=True)  # (1, 3, 1)
    weight = torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]])  # (2, 1)
    labels = torch.tensor([[-100, 1, 0]])
    loss, _ = nll_loss(hidden, weight, labels)
    # position 0 predicts label 1 with p=3/4; position 1 predicts label 0 with p=1/4
    expected = -(torch.log(torch.tensor(0.75)) + torch.log(torch.tensor(0.25))) / 2
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("num_items", [None, 13])
def test_dft_matches_naive(num_items):
    hidden, weight, b, labels = _inputs(seed=2, bias=True)
    picked, mask, _ = _naive_token_logps(hidden, weight, b, labels)
    denom = mask.sum() if num_items is None else num_items
    expected = -(picked.exp().detach() * picked * mask).sum() / denom
    loss, _ = dft_loss(hidden, weight, labels, b, num_items)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(loss, hidden, weight, b), _grads(expected, hidden, weight, b)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_no_scored_token_gives_zero_loss_and_gradient():
    hidden, weight, _, labels = _inputs()
    labels[:] = -100
    for fn in (nll_loss, dft_loss):
        loss, stats = fn(hidden, weight, labels)
        assert loss.item() == 0.0 and stats["num_tokens"].item() == 0
        g_hidden, g_weight = _grads(loss, hidden, weight)
        assert g_hidden.abs().sum() == 0 and g_weight.abs().sum() == 0


def test_bf16_inputs_close_to_fp32_reference():
    hidden, weight, _, labels = _inputs(seed=3)
    ref, _ = nll_loss(hidden.detach(), weight.detach(), labels)
    loss, _ = nll_loss(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
