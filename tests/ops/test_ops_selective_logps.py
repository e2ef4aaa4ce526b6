"""selective_logps / masked_selective_logps against the naive full-logits computation."""

from __future__ import annotations

import pytest
import torch

from honelm.ops import _kernel, masked_selective_logps, selective_logps

N, V, H = 13, 37, 8
TILES = [(1, None), (3, 7), (N, V), (N + 5, V + 3), (4, 1)]


def _inputs(seed: int = 0, n: int = N, v: int = V, h: int = H, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)  # (N, H)
    weight = torch.randn(v, h, generator=g) * scale  # (V, H)
    bias = torch.randn(v, generator=g)  # (V,)
    targets = torch.randint(0, v, (n,), generator=g)  # (N,)
    c1, c2 = torch.randn(n, generator=g), torch.randn(n, generator=g)  # upstream gradients
    return hidden, weight, bias, targets, c1, c2


def _grads(loss: torch.Tensor, tensors: list) -> list:
    ts = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(loss, ts))
    return [None if t is None else next(grads) for t in tensors]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_matches_naive_fp32(naive, make_leaves, tile, temperature, with_bias, with_entropy):
    hidden, weight, bias, targets, c1, c2 = _inputs()
    bias = bias if with_bias else None
    h, w, b = make_leaves(hidden, weight, bias)
    out = selective_logps(h, w, targets, b, temperature=temperature, chunk_size=tile[0],
                          vocab_chunk_size=tile[1], return_entropy=with_entropy)
    logps, entropy = out if with_entropy else (out, None)
    loss = (logps * c1).sum() + ((entropy * c2).sum() if with_entropy else 0)
    grads = _grads(loss, [h, w, b])

    rh, rw, rb = make_leaves(hidden, weight, bias)
    ref_logps, ref_entropy = naive(rh, rw, targets, rb, temperature)
    ref_loss = (ref_logps * c1).sum() + ((ref_entropy * c2).sum() if with_entropy else 0)
    ref_grads = _grads(ref_loss, [rh, rw, rb])

    assert logps.dtype == torch.float32 and logps.shape == (N,)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5)
    if with_entropy:
        torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        if ref is not None:
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_entropy_alone_gets_correct_gradient(naive, make_leaves):
    """Only the entropy enters the loss: the logps output receives no gradient at all."""
    hidden, weight, bias, targets, _, c2 = _inputs(1)
    h, w, b = make_leaves(hidden, weight, bias)
    _, entropy = selective_logps(h, w, targets, b, chunk_size=5, vocab_chunk_size=9, return_entropy=True)
    grads = _grads((entropy * c2).sum(), [h, w, b])
    rh, rw, rb = make_leaves(hidden, weight, bias)
    ref_grads = _grads((naive(rh, rw, targets, rb)[1] * c2).sum(), [rh, rw, rb])
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile", [(1, None), (4, 10)])
def test_bf16_inputs_match_fp32_reference(naive, make_leaves, tile, monkeypatch):
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: False)  # tiles upcast to float32
    hidden, weight, bias, targets, c1, c2 = _inputs(2)
    h, w, b = make_leaves(hidden, weight, bias, dtype=torch.bfloat16)
    logps, entropy = selective_logps(h, w, targets, b, temperature=0.9, chunk_size=tile[0],
                                     vocab_chunk_size=tile[1], return_entropy=True)
    grads = _grads((logps * c1).sum() + (entropy * c2).sum(), [h, w, b])

    rh, rw, rb = make_leaves(h, w, b, dtype=torch.float32)  # same bf16 values, upcast
    ref_logps, ref_entropy = naive(rh, rw, targets, rb, 0.9)
    ref_grads = _grads((ref_logps * c1).sum() + (ref_entropy * c2).sum(), [rh, rw, rb])

    assert logps.dtype == torch.float32
    # without native bf16 the tiles are computed in float32 from the bf16 values: values stay exact
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)


def test_low_precision_matmul_path(naive, make_leaves, monkeypatch):
    """The accelerator path (16-bit matmuls, float32 statistics), exercised on CPU."""
    monkeypatch.setattr(_kernel, "_low_precision_matmul", lambda device, dtype: True)
    hidden, weight, bias, targets, c1, c2 = _inputs(3, scale=0.3)
    h, w, b = make_leaves(hidden, weight, bias, dtype=torch.bfloat16)
    logps, entropy = selective_logps(h, w, targets, b, temperature=0.8, chunk_size=4,
                                     vocab_chunk_size=10, return_entropy=True)
    grads = _grads((logps * c1).sum() + (entropy * c2).sum(), [h, w, b])
    rh, rw, rb = make_leaves(h, w, b, dtype=torch.float32)
    ref_logps, ref_entropy = naive(rh, rw, targets, rb, 0.8)
    ref_grads = _grads((ref_logps * c1).sum() + (ref_entropy * c2).sum(), [rh, rw, rb])
    torch.testing.assert_close(logps, ref_logps, atol=3e-2, rtol=0)  # logits rounded to bf16
    torch.testing.assert_close(entropy, ref_entropy, atol=3e-2, rtol=0)
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_grad_for_one_input_only(naive, which):
    hidden, weight, _, targets, c1, _ = _inputs(4)
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    got = torch.autograd.grad((selective_logps(h, w, targets, chunk_size=3) * c1).sum(), [h if which == "hidden" else w])
    rh = hidden.clone().requires_grad_(which == "hidden")
    rw = weight.clone().requires_grad_(which == "weight")
    ref = torch.autograd.grad((naive(rh, rw, targets)[0] * c1).sum(), [rh if which == "hidden" else rw])
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)


def test_no_grad_inputs_give_plain_tensor(naive):
    hidden, weight, _, targets, _, _ = _inputs(5)
    logps = selective_logps(hidden, weight, targets)
    assert not logps.requires_grad
    torch.testing.assert_close(logps, naive(hidden, weight, targets)[0], atol=1e-5, rtol=1e-5)


def test_large_logits_are_stable(naive):
    hidden, weight, _, targets, _, _ = _inputs(6, scale=40.0)  # logits in the hundreds
    logps, entropy = selective_logps(hidden, weight, targets, vocab_chunk_size=5, return_entropy=True)
    ref_logps, ref_entropy = naive(hidden, weight, targets)
    assert torch.isfinite(logps).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logps, ref_logps, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-4)


def test_leading_dimensions_are_kept(naive):
    hidden, weight, _, targets, _, _ = _inputs(7, n=12)
    logps = selective_logps(hidden.view(3, 4, H), weight, targets.view(3, 4), chunk_size=5)
    assert logps.shape == (3, 4)
    torch.testing.assert_close(logps.reshape(-1), naive(hidden, weight, targets)[0], atol=1e-5, rtol=1e-5)


def test_empty_input_gives_empty_output_and_zero_grads():
    h = torch.zeros(0, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    logps, entropy = selective_logps(h, w, torch.zeros(0, dtype=torch.long), b, return_entropy=True)
    assert logps.shape == (0,) and entropy.shape == (0,)
    (logps.sum() + entropy.sum()).backward()
    assert h.grad.shape == (0, H)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_masked_matches_naive_and_zeroes_masked_positions(naive, make_leaves):
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 6, H, generator=g)  # (B, T, H)
    weight, bias = torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    targets = torch.randint(0, V, (2, 6), generator=g)  # (B, T)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    targets_in = targets.masked_fill(~mask, -100)  # garbage where masked is allowed
    c1, c2 = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)

    h, w, b = make_leaves(hidden, weight, bias)
    logps, entropy = masked_selective_logps(h, w, targets_in, mask, b, temperature=1.3, chunk_size=2,
                                            vocab_chunk_size=8, return_entropy=True)
    grads = _grads((logps * c1).sum() + (entropy * c2).sum(), [h, w, b])

    rh, rw, rb = make_leaves(hidden, weight, bias)
    ref_logps, ref_entropy = naive(rh, rw, targets, rb, 1.3)
    m = mask.float()
    ref_grads = _grads((ref_logps * c1 * m).sum() + (ref_entropy * c2 * m).sum(), [rh, rw, rb])

    assert logps.shape == (2, 6)
    assert torch.equal(logps[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(entropy[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(logps[mask], ref_logps[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_masked_with_empty_mask():
    h = torch.randn(2, 3, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    logps = masked_selective_logps(h, w, torch.full((2, 3), -100), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(logps, torch.zeros(2, 3))
    logps.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_out_of_range_target_names_its_position():
    hidden, weight, _, targets, _, _ = _inputs(9, n=12)
    targets = targets.view(3, 4).clone()
    targets[1, 2] = V
    with pytest.raises(ValueError, match=r"position \(1, 2\) is 37, outside the vocabulary \[0, 37\)"):
        selective_logps(hidden.view(3, 4, H), weight, targets)
    mask = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"position \(1, 2\).*inside `mask`"):
        masked_selective_logps(hidden.view(3, 4, H), weight, targets, mask)
    mask[1, 2] = False  # masked out: fine
    masked_selective_logps(hidden.view(3, 4, H), weight, targets, mask)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"weight": torch.randn(V, H + 1)}, ValueError, "hidden size mismatch"),
        ({"targets": torch.zeros(N)}, TypeError, "integer tensor"),
        ({"targets": torch.zeros(N + 1, dtype=torch.long)}, ValueError, "Shift labels"),
        ({"bias": torch.zeros(V + 1)}, ValueError, r"`bias` must have shape \(37,\)"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"vocab_chunk_size": 2.5}, ValueError, "vocab_chunk_size"),
    ],
)
def test_bad_inputs_are_explained(kwargs, error, pattern):
    hidden, weight, _, targets, _, _ = _inputs(10)
    args = {"hidden": hidden, "weight": weight, "targets": targets, **kwargs}
    with pytest.raises(error, match=pattern):
        selective_logps(**args)


def test_low_precision_matmul_decision(monkeypatch):
    """16-bit matmuls: always on accelerators; on CPU only bfloat16, and only where it is native."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _kernel._low_precision_matmul(cuda, torch.float16) and _kernel._low_precision_matmul(cuda, torch.bfloat16)
    assert not _kernel._low_precision_matmul(cuda, torch.float32)
    for native in (True, False):
        monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda native=native: native)
        assert _kernel._low_precision_matmul(cpu, torch.bfloat16) is native
        assert not _kernel._low_precision_matmul(cpu, torch.float16)
        assert not _kernel._low_precision_matmul(cpu, torch.float32)


def test_autocast_on_cpu_without_native_bf16_keeps_float32_tiles(naive, make_leaves, monkeypatch):
    """Under CPU autocast on a CPU without native bfloat16 the tiles still run in float32:
    results equal the float32 reference."""
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: False)
    hidden, weight, bias, targets, c1, _ = _inputs(11)
    h, w, b = make_leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = selective_logps(h, w, targets, b, chunk_size=4, vocab_chunk_size=10)
    grads = _grads((logps * c1).sum(), [h, w, b])
    rh, rw, rb = make_leaves(hidden, weight, bias)
    ref_grads = _grads((naive(rh, rw, targets, rb)[0] * c1).sum(), [rh, rw, rb])
    torch.testing.assert_close(logps, naive(hidden, weight, targets, bias)[0], atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_autocast_dtype_drives_low_precision_matmuls(naive, make_leaves, monkeypatch):
    """On accelerators, autocast makes the head's matmuls run in its dtype, like nn.Linear."""
    seen = []
    monkeypatch.setattr(_kernel, "_low_precision_matmul", lambda device, dtype: seen.append(dtype) or True)
    hidden, weight, _, targets, c1, _ = _inputs(12, scale=0.3)
    h, w = make_leaves(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = selective_logps(h, w, targets, chunk_size=4)
    grads = _grads((logps * c1).sum(), [h, w])
    assert set(seen) == {torch.bfloat16}
    rh, rw = make_leaves(hidden, weight)
    ref_logps = naive(rh, rw, targets)[0]
    ref_grads = _grads((ref_logps * c1).sum(), [rh, rw])
    torch.testing.assert_close(logps, ref_logps, atol=3e-2, rtol=0)
    assert (logps - ref_logps).abs().max() > 0  # really went through bf16
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.float32  # gradients come back in the parameters' dtype
        torch.testing.assert_close(got, ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


def test_very_unlikely_targets_take_the_exact_fallback(naive, make_leaves, monkeypatch):
    """Rows whose target is > ~88 nats below the best token overflow exp(z - z_t): they are
    redone shifted by the row maximum, with values, entropy and gradients still exact."""
    calls = []
    row_max = _kernel._row_max
    monkeypatch.setattr(_kernel, "_row_max", lambda head, *a: calls.append(head.hidden.shape[0]) or row_max(head, *a))
    hidden, weight, _, targets, c1, c2 = _inputs(13, scale=12.0)
    logits = hidden @ weight.T  # (N, V)
    targets = targets.clone()
    targets[:4] = logits[:4].argmin(-1)  # far below the best token
    target_logits = logits.gather(-1, targets[:, None])  # (N, 1)
    sumexp = torch.exp((logits - target_logits).double()).sum(-1)  # (N,)
    overflowing = int((sumexp > 3e38).sum())
    redone = int((sumexp > _kernel._ENTROPY_MAX_SUMEXP).sum())  # the entropy is wanted below
    assert 4 <= overflowing < redone < N  # all paths are taken
    h, w = make_leaves(hidden, weight)
    logps, entropy = selective_logps(h, w, targets, chunk_size=3, vocab_chunk_size=8, return_entropy=True)
    grads = _grads((logps * c1).sum() + (entropy * c2).sum(), [h, w])
    rh, rw = make_leaves(hidden, weight)
    ref_logps, ref_entropy = naive(rh, rw, targets)
    ref_grads = _grads((ref_logps * c1).sum() + (ref_entropy * c2).sum(), [rh, rw])
    assert calls == [redone]  # only rows with a wide gap were redone
    torch.testing.assert_close(logps, ref_logps, atol=1e-4, rtol=1e-5)  # values near -100
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-4)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    calls.clear()  # without the entropy, only the rows that overflow are redone
    torch.testing.assert_close(selective_logps(hidden, weight, targets, chunk_size=3, vocab_chunk_size=8),
                               ref_logps, atol=1e-4, rtol=1e-5)
    assert calls == [overflowing]


def _no_tiles_in_backward(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the frozen-head backward must not recompute tiles")

    monkeypatch.setattr(_kernel, "_backward_tiles", fail)


@pytest.mark.parametrize("tile", [(1, None), (3, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_frozen_head_matches_naive(naive, monkeypatch, tile, temperature, with_bias, with_entropy):
    """Only hidden needs a gradient (LoRA on the body): the forward keeps P @ W and the
    backward is closed-form."""
    _no_tiles_in_backward(monkeypatch)
    hidden, weight, bias, targets, c1, c2 = _inputs(14)
    bias = bias if with_bias else None
    h = hidden.clone().requires_grad_()
    out = selective_logps(h, weight, targets, bias, temperature=temperature, chunk_size=tile[0],
                          vocab_chunk_size=tile[1], return_entropy=with_entropy)
    logps, entropy = out if with_entropy else (out, None)
    loss = (logps * c1).sum() + ((entropy * c2).sum() if with_entropy else 0)
    (grad,) = torch.autograd.grad(loss, [h])
    rh = hidden.clone().requires_grad_()
    ref_logps, ref_entropy = naive(rh, weight, targets, bias, temperature)
    ref_loss = (ref_logps * c1).sum() + ((ref_entropy * c2).sum() if with_entropy else 0)
    (ref_grad,) = torch.autograd.grad(ref_loss, [rh])
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_frozen_head_entropy_only_and_fallback_rows(naive, monkeypatch):
    """Frozen head, gradient through the entropy alone, some rows on the overflow fallback."""
    _no_tiles_in_backward(monkeypatch)
    hidden, weight, _, targets, _, c2 = _inputs(15, scale=12.0)
    targets = targets.clone()
    targets[:3] = (hidden[:3] @ weight.T).argmin(-1)
    h = hidden.clone().requires_grad_()
    _, entropy = selective_logps(h, weight, targets, chunk_size=4, vocab_chunk_size=8, return_entropy=True)
    (grad,) = torch.autograd.grad((entropy * c2).sum(), [h])
    rh = hidden.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad((naive(rh, weight, targets)[1] * c2).sum(), [rh])
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)


def test_frozen_head_low_precision_path(naive, monkeypatch):
    _no_tiles_in_backward(monkeypatch)
    monkeypatch.setattr(_kernel, "_low_precision_matmul", lambda device, dtype: True)
    hidden, weight, _, targets, c1, c2 = _inputs(16, scale=0.3)
    h = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.to(torch.bfloat16)
    logps, entropy = selective_logps(h, w, targets, temperature=0.8, chunk_size=4, vocab_chunk_size=10,
                                     return_entropy=True)
    (grad,) = torch.autograd.grad((logps * c1).sum() + (entropy * c2).sum(), [h])
    rh = h.detach().float().requires_grad_()
    ref_logps, ref_entropy = naive(rh, w.float(), targets, None, 0.8)
    (ref_grad,) = torch.autograd.grad((ref_logps * c1).sum() + (ref_entropy * c2).sum(), [rh])
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), ref_grad, atol=3e-2 * ref_grad.abs().max().item(), rtol=3e-2)
