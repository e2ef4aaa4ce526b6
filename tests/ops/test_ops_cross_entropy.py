"""chunked_cross_entropy against torch.nn.functional.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from honelm.ops import _kernel, chunked_cross_entropy

B, T, V, H = 2, 7, 41, 8


def _inputs(seed: int = 0, ignore_frac: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)  # (B, T, H)
    weight = torch.randn(V, H, generator=g)  # (V, H)
    bias = torch.randn(V, generator=g)  # (V,)
    labels = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return hidden, weight, bias, labels


def _naive(hidden, weight, labels, bias=None, reduction="mean"):
    logits = hidden.float() @ weight.float().T + (0 if bias is None else bias.float())  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction=reduction).reshape(
        labels.shape if reduction == "none" else ()
    )


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tile", [(1, None), (3, 5), (100, 100)])
def test_matches_torch_cross_entropy(make_leaves, reduction, tile):
    hidden, weight, bias, labels = _inputs()
    h, w, b = make_leaves(hidden, weight, bias)
    loss = chunked_cross_entropy(h, w, labels, b, reduction=reduction, chunk_size=tile[0], vocab_chunk_size=tile[1])
    rh, rw, rb = make_leaves(hidden, weight, bias)
    ref = _naive(rh, rw, labels, rb, reduction)
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn(ref.shape) if reduction == "none" else torch.tensor(1.0)
    for got, exp in zip(_grads((loss * weights).sum(), [h, w, b]), _grads((ref * weights).sum(), [rh, rw, rb])):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_ignored_positions_get_zero_loss_and_zero_grad(make_leaves):
    hidden, weight, _, labels = _inputs(1)
    ignored = labels == -100
    assert ignored.any() and (~ignored).any()
    h, w = make_leaves(hidden, weight)
    loss = chunked_cross_entropy(h, w, labels, reduction="none", chunk_size=2)
    assert torch.equal(loss[ignored], torch.zeros(int(ignored.sum())))
    loss.sum().backward()
    assert torch.equal(h.grad[ignored], torch.zeros_like(h.grad[ignored]))
    assert (h.grad[~ignored].abs().sum(-1) > 0).all()


def test_custom_ignore_index():
    hidden, weight, _, labels = _inputs(2)
    labels = labels.masked_fill(labels == -100, V + 7)  # an id outside the vocabulary marks "no target"
    loss = chunked_cross_entropy(hidden, weight, labels, ignore_index=V + 7)
    ref = _naive(hidden, weight, labels.masked_fill(labels == V + 7, -100))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_replaces_the_denominator(make_leaves, as_tensor):
    hidden, weight, _, labels = _inputs(3)
    num_items = 23  # e.g. valid tokens over all accumulated micro-batches
    h, w = make_leaves(hidden, weight)
    n = torch.tensor(num_items) if as_tensor else num_items
    loss = chunked_cross_entropy(h, w, labels, num_items_in_batch=n, chunk_size=3)
    rh, rw = make_leaves(hidden, weight)
    ref = _naive(rh, rw, labels, reduction="sum") / num_items
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for got, exp in zip(_grads(loss, [h, w]), _grads(ref, [rh, rw])):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("reduction", "num_items"), [("mean", None), ("sum", None), ("none", None), ("mean", 0), ("mean", "tensor0")]
)
def test_all_ignored_gives_zero_loss_and_zero_grad(reduction, num_items):
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    labels = torch.full((B, T), -100)
    n = torch.tensor(0) if num_items == "tensor0" else num_items
    loss, stats = chunked_cross_entropy(h, w, labels, b, reduction=reduction, num_items_in_batch=n,
                                        return_stats=True)
    assert torch.equal(loss, torch.zeros(labels.shape if reduction == "none" else ()))
    loss.sum().backward()
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert int(stats["num_tokens"]) == 0 and int(stats["num_correct"]) == 0 and float(stats["entropy_sum"]) == 0


@pytest.mark.parametrize("tile", [(2, 6), (None, None)])
def test_stats_match_naive(make_leaves, tile):
    hidden, weight, bias, labels = _inputs(4, ignore_frac=0.3)
    g = torch.Generator().manual_seed(0)
    # make about half the labels the argmax, so num_correct is neither 0 nor all
    logits = hidden @ weight.T + bias  # (B, T, V)
    pick = torch.rand(B, T, generator=g) < 0.5
    labels = torch.where(pick & (labels != -100), logits.argmax(-1), labels)
    h, w, b = make_leaves(hidden, weight, bias)
    loss, stats = chunked_cross_entropy(h, w, labels, b, chunk_size=tile[0], vocab_chunk_size=tile[1],
                                        return_stats=True)
    valid = labels != -100
    logp = torch.log_softmax(logits, -1)
    assert int(stats["num_tokens"]) == int(valid.sum())
    assert int(stats["num_correct"]) == int((logits.argmax(-1) == labels)[valid].sum())
    assert 0 < int(stats["num_correct"]) < int(valid.sum())
    torch.testing.assert_close(stats["entropy_sum"], -(logp.exp() * logp).sum(-1)[valid].sum(), atol=1e-4, rtol=1e-5)
    assert all(not v.requires_grad for v in stats.values())
    # the gradient is the plain cross-entropy gradient: the stats add nothing to it
    rh, rw, rb = make_leaves(hidden, weight, bias)
    ref = _naive(rh, rw, labels, rb)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, exp in zip(_grads(loss, [h, w, b]), _grads(ref, [rh, rw, rb])):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_bf16_inputs(make_leaves, monkeypatch):
    """The tiled path on a CPU without native bfloat16 (tiles upcast to float32)."""
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: False)
    hidden, weight, bias, labels = _inputs(5)
    h, w, b = make_leaves(hidden, weight, bias, dtype=torch.bfloat16)
    loss = chunked_cross_entropy(h, w, labels, b, chunk_size=4, vocab_chunk_size=16)
    rh, rw, rb = make_leaves(h, w, b, dtype=torch.float32)
    ref = _naive(rh, rw, labels, rb)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, exp in zip(_grads(loss, [h, w, b]), _grads(ref, [rh, rw, rb])):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), exp, atol=1e-2 * exp.abs().max().item(), rtol=1e-2)


def test_label_out_of_range_names_its_position():
    hidden, weight, _, labels = _inputs(6, ignore_frac=0.0)
    labels[1, 3] = -1
    with pytest.raises(ValueError, match=r"`labels` at position \(1, 3\) is -1.*ignore_index=-100"):
        chunked_cross_entropy(hidden, weight, labels)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"reduction": "sum", "num_items_in_batch": 4}, ValueError, "num_items_in_batch"),
        ({"num_items_in_batch": -1}, ValueError, "num_items_in_batch"),
        ({"num_items_in_batch": 0}, ValueError, "valid tokens"),
        ({"num_items_in_batch": "8"}, TypeError, "num_items_in_batch"),
        ({"num_items_in_batch": torch.ones(2)}, ValueError, "1-element"),
    ],
)
def test_bad_arguments_are_explained(kwargs, error, pattern):
    hidden, weight, _, labels = _inputs(7)
    with pytest.raises(error, match=pattern):
        chunked_cross_entropy(hidden, weight, labels, **kwargs)


def test_stats_survive_the_overflow_fallback():
    """Labels far below the best token take the exact fallback; argmax and entropy stay right."""
    hidden, weight, _, labels = _inputs(8, ignore_frac=0.2)
    weight = weight * 12.0  # logits in the hundreds
    logits = hidden @ weight.T  # (B, T, V)
    labels = torch.where(labels == -100, labels, logits.argmin(-1))  # the least likely token
    loss, stats = chunked_cross_entropy(hidden, weight, labels, vocab_chunk_size=8, return_stats=True)
    valid = labels != -100
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(loss, _naive(hidden, weight, labels), atol=1e-3, rtol=1e-5)
    assert int(stats["num_correct"]) == int((logits.argmax(-1) == labels)[valid].sum()) == 0
    # the argmax itself, on rows that went through the fallback
    flat_logits, flat_labels = logits.reshape(-1, V)[valid.reshape(-1)], labels[valid]
    opts = _kernel.TileOptions(rows=3, cols=8, argmax=True)
    _, _, argmax = _kernel.LMHeadLogps.apply(hidden.reshape(-1, H)[valid.reshape(-1)], weight, None, flat_labels, opts)
    assert torch.equal(argmax, flat_logits.argmax(-1))
    torch.testing.assert_close(stats["entropy_sum"], -(logp.exp() * logp).sum(-1)[valid].sum(), atol=1e-3, rtol=1e-4)
