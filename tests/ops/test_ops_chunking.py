"""Tile sizing, and proof that no (tokens, vocab) tensor is ever allocated."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from honelm.ops import _kernel, auto_chunk_size, auto_vocab_chunk_size, chunked_cross_entropy, selective_logps


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


N, V, H = 64, 97, 4  # N * V = 6208 dwarfs every other tensor: hidden 256, weight 388


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)  # (N, H)
    weight = torch.randn(V, H, generator=g, requires_grad=True)  # (V, H)
    bias = torch.randn(V, generator=g, requires_grad=True)  # (V,)
    targets = torch.randint(0, V, (N,), generator=g)  # (N,)
    return hidden, weight, bias, targets


def test_dispatch_probe_sees_the_naive_logits():
    """The probe would catch a full (N, V) tensor: it does on the naive computation."""
    hidden, weight, bias, targets = _inputs()
    with _LargestTensor() as probe:
        logps = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[:, None])
        logps.sum().backward()
    assert probe.largest >= N * V


@pytest.mark.parametrize("entropy", [False, True])
def test_selective_logps_never_allocates_full_logits(entropy):
    hidden, weight, bias, targets = _inputs()
    rows, cols = 8, 16
    with _LargestTensor() as probe:
        out = selective_logps(hidden, weight, targets, bias, temperature=0.9, chunk_size=rows,
                              vocab_chunk_size=cols, return_entropy=entropy)
        loss = (out[0] + out[1]).sum() if entropy else out.sum()
        saved = loss.grad_fn  # walk to the chunked op and look at what it saved for backward
        while saved is not None and type(saved).__name__ != "LMHeadLogpsBackward":
            saved = saved.next_functions[0][0]
        saved_sizes = [t.numel() for t in saved.saved_tensors if t is not None]
        loss.backward()
    assert max(saved_sizes) <= V * H  # the inputs and (N,) statistics, nothing (N, V)
    assert probe.largest <= max(V * H, rows * cols)
    assert probe.largest < N * V


def test_cross_entropy_with_stats_never_allocates_full_logits():
    hidden, weight, bias, targets = _inputs(1)
    with _LargestTensor() as probe:
        loss, _ = chunked_cross_entropy(hidden, weight, targets, bias, chunk_size=8, vocab_chunk_size=16,
                                        return_stats=True)
        loss.backward()
    assert probe.largest <= max(V * H, 8 * 16)


def test_automatic_tiles_respect_the_budget(monkeypatch):
    """With chunk_size=None the tiles come from the byte budget; results stay exact."""
    budget = 1024  # bytes: 128 float32 logits with one temporary each
    monkeypatch.setattr(_kernel, "DEFAULT_BUDGET_BYTES", budget)
    hidden, weight, bias, targets = _inputs(2)
    with _LargestTensor() as probe:
        logps = selective_logps(hidden, weight, targets, bias)
        logps.sum().backward()
    assert probe.largest <= max(V * H, budget // 8)
    ref = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 4096, 8192, 100_000])
@pytest.mark.parametrize("vocab", [1, 50, 32_000, 151_936])
def test_auto_chunk_size_bounds(dtype, num_tokens, vocab):
    budget = 32 * 2**20
    rows = auto_chunk_size(num_tokens, vocab, dtype, budget_bytes=budget)
    cols = auto_vocab_chunk_size(rows, vocab, dtype, budget_bytes=budget)
    assert 1 <= rows <= max(num_tokens, 1)
    assert 1 <= cols <= vocab
    assert rows * cols * _kernel._bytes_per_logit(dtype) <= budget
    if num_tokens * vocab * _kernel._bytes_per_logit(dtype) <= budget:
        assert (rows, cols) == (max(num_tokens, 1), vocab)  # one tile when everything fits


def test_auto_chunk_size_shapes():
    # a large vocabulary gets near-square tiles; a small one is taken whole
    assert auto_chunk_size(4096, 151_936) == 2048
    assert auto_vocab_chunk_size(2048, 151_936) == 2026  # 75 equal chunks of the vocabulary
    assert auto_chunk_size(100_000, 300) == 12_500  # 8 equal chunks of <= 4M / 300 rows
    assert auto_vocab_chunk_size(1, 151_936) == 151_936
    # 16-bit inputs need a 16-bit copy of the tile: fewer logits fit
    assert auto_chunk_size(10**6, 151_936, torch.bfloat16) < auto_chunk_size(10**6, 151_936, torch.float32)
    # a budget smaller than one logit still gives one row and one column
    assert auto_chunk_size(10, 10, budget_bytes=1) == 1
    assert auto_vocab_chunk_size(1, 10, budget_bytes=1) == 1


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (auto_chunk_size, (-1, 10), {}),
        (auto_chunk_size, (10, 0), {}),
        (auto_chunk_size, (10, 10), {"budget_bytes": 0}),
        (auto_vocab_chunk_size, (0, 10), {}),
    ],
)
def test_auto_chunk_size_rejects_bad_arguments(fn, args, kwargs):
    with pytest.raises(ValueError):
        fn(*args, **kwargs)
