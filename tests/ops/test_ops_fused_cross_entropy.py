"""The fused cross-entropy path (summed loss, gradients computed in the forward pass)
against the naive full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from honelm.ops import _fused_ce, _kernel, chunked_cross_entropy


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(seed=0, n=23, v=41, h=8, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, b, labels


def _naive(hidden, weight, bias, labels, reduction, num_items=None):
    logits = hidden.float() @ weight.float().T + (bias.float() if bias is not None else 0)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    if reduction == "mean":
        loss = loss / (num_items if num_items is not None else (labels != -100).sum())
    return loss, logits


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def _uses_fused_path(loss):
    node, seen = loss.grad_fn, []
    stack = [node]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        seen.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return "FusedCrossEntropySumBackward" in seen


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 23, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_match_naive(reduction, chunk_size, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    loss = chunked_cross_entropy(hidden, weight, labels, b, reduction=reduction, chunk_size=chunk_size)
    assert _uses_fused_path(loss)
    expected, _ = _naive(hidden, weight, b, labels, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(loss, (hidden, weight, b)), _grads(expected, (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_upstream_gradient_scales_the_result_and_num_items_divides():
    hidden, weight, b, labels = _inputs(seed=1)
    loss = chunked_cross_entropy(hidden, weight, labels, b, num_items_in_batch=7) * 3.5
    expected, _ = _naive(hidden, weight, b, labels, "mean", num_items=7)
    expected = expected * 3.5
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(loss, (hidden, weight, b)), _grads(expected, (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_stats_match_naive():
    hidden, weight, b, labels = _inputs(seed=2)
    _, stats = chunked_cross_entropy(hidden, weight, labels, b, return_stats=True, chunk_size=5)
    _, logits = _naive(hidden, weight, b, labels, "sum")
    keep = labels != -100
    assert stats["num_tokens"].item() == keep.sum().item()
    assert stats["num_correct"].item() == (logits.argmax(-1) == labels)[keep].sum().item()
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)[keep].sum()
    torch.testing.assert_close(stats["entropy_sum"], entropy.detach(), rtol=1e-5, atol=1e-4)
    assert not stats["entropy_sum"].requires_grad and not stats["num_correct"].requires_grad


def test_only_hidden_or_only_weight_requires_grad():
    hidden, weight, _, labels = _inputs(seed=3, bias=False)
    frozen_w = weight.detach()
    loss = chunked_cross_entropy(hidden, frozen_w, labels, reduction="sum")
    (g_h,) = torch.autograd.grad(loss, [hidden])
    expected, _ = _naive(hidden, frozen_w, None, labels, "sum")
    torch.testing.assert_close(g_h, torch.autograd.grad(expected, [hidden])[0], rtol=1e-4, atol=1e-5)
    frozen_h = hidden.detach()
    loss = chunked_cross_entropy(frozen_h, weight, labels, reduction="sum")
    expected, _ = _naive(frozen_h, weight, None, labels, "sum")
    torch.testing.assert_close(
        torch.autograd.grad(loss, [weight])[0], torch.autograd.grad(expected, [weight])[0], rtol=1e-4, atol=1e-5
    )


def test_bf16_inputs_close_to_fp32_reference_with_grads_in_input_dtype():
    hidden, weight, b, labels = _inputs(seed=4, dtype=torch.bfloat16)
    loss = chunked_cross_entropy(hidden, weight, labels, b, reduction="sum")
    g_h, g_w, g_b = _grads(loss, (hidden, weight, b))
    assert g_h.dtype == g_w.dtype == g_b.dtype == torch.bfloat16
    ref_inputs = [t.detach().float().requires_grad_() for t in (hidden, weight, b)]
    expected, _ = _naive(*ref_inputs, labels, "sum")
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    for got, want in zip((g_h, g_w, g_b), _grads(expected, ref_inputs)):
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


def test_every_label_ignored_gives_zero_loss_and_gradient():
    hidden, weight, b, labels = _inputs(seed=5)
    labels[:] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, b, reduction="sum")
    assert loss.item() == 0.0
    assert all(g.abs().sum() == 0 for g in _grads(loss, (hidden, weight, b)))


def test_no_grad_and_reduction_none_use_the_tiled_path():
    hidden, weight, b, labels = _inputs(seed=6)
    with torch.no_grad():
        assert chunked_cross_entropy(hidden, weight, labels, b).grad_fn is None
    assert not _uses_fused_path(chunked_cross_entropy(hidden, weight, labels, b, reduction="none").sum())
    assert not _uses_fused_path(chunked_cross_entropy(hidden, weight, labels, b, vocab_chunk_size=8))


def test_fused_path_never_allocates_full_logits():
    n, v = 64, 97
    hidden, weight, b, labels = _inputs(seed=7, n=n, v=v, h=4)
    with _LargestTensor() as probe:
        loss, _ = chunked_cross_entropy(hidden, weight, labels, b, chunk_size=8, return_stats=True)
        loss.backward()
    assert probe.largest <= max(v * 4, 8 * v) < n * v


def test_automatic_rows_respect_the_budget():
    assert _fused_ce.fused_rows(4096, 151936) == _fused_ce.FUSED_BUDGET_BYTES // (4 * 151936)
    assert _fused_ce.fused_rows(3, 10) == 3 and _fused_ce.fused_rows(10**9, 10**9) == 1


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("native", [True, False])
def test_autocast_bf16_on_cpu_multiplies_in_bf16_only_where_native(monkeypatch, native):
    """Like an nn.Linear under autocast, the fused path multiplies in bfloat16 on a CPU with
    native bfloat16 (results then match the autocast reference); elsewhere it stays float32
    and matches the float32 reference closely."""
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: native)
    hidden, weight, b, labels = _inputs(seed=6, n=40, v=57, h=16)
    seen = _MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), seen:
        loss = chunked_cross_entropy(hidden, weight, labels, b, reduction="sum")
    got = _grads(loss, (hidden, weight, b))
    assert all(g.dtype == torch.float32 for g in got)
    assert seen.dtypes == ({torch.bfloat16} if native else {torch.float32})
    ref_inputs = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    if native:  # reference: the same head as an autocast nn.Linear, loss in float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(ref_inputs[0], ref_inputs[1], ref_inputs[2])
        expected = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        tol = {"rtol": 3e-2, "atol": 3e-2}
    else:
        expected, _ = _naive(*ref_inputs, labels, "sum")
        tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(loss, expected, **tol)
    for g, want in zip(got, _grads(expected, ref_inputs)):
        torch.testing.assert_close(g, want, **tol)
