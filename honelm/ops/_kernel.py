"""Tiled LM-head kernel: log-probs of chosen tokens without full-vocabulary logits.

The logits ``z = (hidden @ weight.T + bias) / temperature`` of shape ``(N, V)`` are
never materialized. They are computed one tile of ``rows x cols`` at a time (rows of
``hidden``, columns of the vocabulary) and reduced on the fly:

* forward: each row is shifted by its own target logit ``c = z_t`` (a row-wise dot
  product, computed up front), so the per-row sum ``S = sum exp(z - c)`` accumulates
  over vocabulary tiles with no running maximum and no rescaling, and
  ``logps = -log S``. The shift rides along in the matmul. On request the same pass
  gives the entropy (from ``T = sum exp(z - c) * (z - c)``) and the argmax. Rows whose
  target is far below their best token (where ``exp(z - c)`` would overflow, or where
  the entropy would lose precision) are redone shifted by their exact maximum. Only
  ``(N,)`` vectors survive a tile.
* backward: each tile's logits are recomputed from the saved ``hidden`` and ``weight``,
  turned into the tile's ``-dL/dz`` with one ``exp`` (the upstream gradient's magnitude
  rides along in the shift, its sign is applied to ``(N, H)`` operands), and contracted
  right away into ``grad_hidden``, ``grad_weight`` and ``grad_bias``.
* frozen head (only ``hidden`` needs a gradient): the forward also accumulates
  ``P @ W`` per row and the backward is closed-form, with no second pass over the tiles.

With weight gradients this costs four matmuls of the size of the logits (forward,
recompute, ``grad_hidden``, ``grad_weight``) against three for the naive computation,
in exchange for memory that no longer grows with ``tokens x vocab``.

Softmax statistics and every gradient accumulation run in float32. 16-bit inputs (or
any inputs under autocast, in the autocast dtype) are multiplied in 16 bits and the
products upcast to float32, as an ``nn.Linear`` under autocast would, on accelerators
and on CPUs that multiply bfloat16 natively (see :func:`_low_precision_matmul`); other
CPUs upcast 16-bit inputs to float32 one tile at a time. Autocast itself is switched
off inside.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

DEFAULT_BUDGET_BYTES = 32 * 1024 * 1024
"""Default memory budget of one logits tile and its temporaries (32 MiB)."""


def _low_precision_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether matmuls run in a 16-bit input dtype instead of upcasting to float32.

    Accelerators: float16 and bfloat16. CPU: bfloat16 only, and only where the processor
    multiplies it natively (AVX512-BF16 or AMX), where it is about twice as fast as
    float32; elsewhere 16-bit products are emulated and slower than upcasting.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if device.type != "cpu":
        return True
    return dtype == torch.bfloat16 and cpu_has_native_bf16()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _bytes_per_logit(dtype: torch.dtype) -> int:
    """Bytes held per logit of a tile: the float32 tile, one float32 temporary and,
    for 16-bit inputs, a 16-bit copy of the tile."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 8 + (itemsize if itemsize < 4 else 0)


def _max_logits(budget_bytes: int | None, dtype: torch.dtype) -> int:
    """How many logits of a tile fit the budget (at least 1)."""
    budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget_bytes must be a positive int or None, got {budget_bytes!r}.")
    return max(budget // _bytes_per_logit(dtype), 1)


def _balanced(total: int, max_part: int) -> int:
    """Largest part size <= ``max_part`` that splits ``total`` into equal-ish parts."""
    if total <= max_part:
        return max(total, 1)
    parts = math.ceil(total / max_part)
    return math.ceil(total / parts)


def auto_chunk_size(
    num_tokens: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    budget_bytes: int | None = None,
) -> int:
    """Rows of hidden states per chunk so that one logits tile fits ``budget_bytes``.

    Tiles are kept close to square (rows ~ vocabulary columns): that keeps every matmul
    efficient and the per-tile accumulations of ``grad_weight`` and ``grad_hidden``
    cheap. With few tokens the whole batch is one chunk and the vocabulary is split
    instead (see :func:`auto_vocab_chunk_size`).

    Args:
        num_tokens: number of rows N that go through the LM head.
        vocab_size: vocabulary size V.
        dtype: dtype of the hidden states / weight (16-bit inputs need a little more
            room per logit for the 16-bit copy of a tile).
        budget_bytes: memory allowed for one tile and its temporaries; ``None`` means
            the default budget of 32 MiB.

    Returns:
        The chunk size in rows, between 1 and ``max(num_tokens, 1)``.
    """
    if num_tokens < 0 or vocab_size < 1:
        raise ValueError(
            f"auto_chunk_size needs num_tokens >= 0 and vocab_size >= 1, got "
            f"num_tokens={num_tokens}, vocab_size={vocab_size}."
        )
    max_logits = _max_logits(budget_bytes, dtype)
    square_side = max(math.isqrt(max_logits), 1)
    # a narrow vocabulary leaves room for more rows per chunk
    max_rows = max(max_logits // min(vocab_size, square_side), 1)
    return _balanced(num_tokens, max_rows)


def auto_vocab_chunk_size(
    chunk_size: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    budget_bytes: int | None = None,
) -> int:
    """Vocabulary columns per tile for chunks of ``chunk_size`` rows within ``budget_bytes``.

    Returns a size between 1 and ``vocab_size``; the whole vocabulary when it fits.
    ``budget_bytes=None`` means the default budget of 32 MiB.
    """
    if chunk_size < 1 or vocab_size < 1:
        raise ValueError(
            f"auto_vocab_chunk_size needs chunk_size >= 1 and vocab_size >= 1, got "
            f"chunk_size={chunk_size}, vocab_size={vocab_size}."
        )
    max_logits = _max_logits(budget_bytes, dtype)
    return _balanced(vocab_size, max(max_logits // chunk_size, 1))


@dataclass
class _Head:
    """The LM head operands prepared for tiled matmuls, shared by forward and backward."""

    hidden: torch.Tensor  # (N, H) matmul operand; float32 path: already times 1/temperature
    weight: torch.Tensor  # (V, H) as given
    bias: torch.Tensor | None  # (V,) float32, times 1/temperature
    inv_temperature: float
    low_precision: bool

    @classmethod
    def build(
        cls,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inv_temperature: float,
        matmul_dtype: torch.dtype,
    ) -> _Head:
        low = _low_precision_matmul(hidden.device, matmul_dtype)
        if low:
            h = hidden.to(matmul_dtype)
        else:
            h = hidden.float()
            if inv_temperature != 1.0:
                h = h * inv_temperature
        b = None if bias is None else bias.float() * inv_temperature  # (V,)
        return cls(h, weight, b, inv_temperature, low)

    @property
    def grad_scale(self) -> float:
        """Factor the weight gradient still needs (the float32 operand already carries 1/T)."""
        return self.inv_temperature if self.low_precision else 1.0

    def rows(self, index: torch.Tensor) -> _Head:
        """The same head restricted to rows ``index`` of the hidden states."""
        return replace(self, hidden=self.hidden.index_select(0, index))

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        """Vocabulary rows ``v0:v1`` of the weight in the matmul dtype, shape (c, H)."""
        return self.weight[v0:v1].to(self.hidden.dtype)

    def target_logits(self, targets: torch.Tensor) -> torch.Tensor:
        """``z[i, targets[i]]`` for every row, float32 (N,), from a row-wise dot product."""
        w_t = self.weight.index_select(0, targets).float()  # (N, H)
        z_t = (self.hidden.float() * w_t).sum(dim=1)  # (N,)
        if self.low_precision and self.inv_temperature != 1.0:
            z_t = z_t * self.inv_temperature
        return z_t if self.bias is None else z_t + self.bias.index_select(0, targets)

    def logits(self, r0: int, r1: int, w: torch.Tensor, v0: int, shift: torch.Tensor | None) -> torch.Tensor:
        """Float32 tile ``z[r0:r1, v0:v0+c] + shift[:, None]``, (r, c).

        On the float32 path the per-row ``shift`` rides along in the matmul (``addmm``
        with a broadcast column), so shifting costs no extra pass over the tile.
        """
        h = self.hidden[r0:r1]
        b = None if self.bias is None else self.bias[v0 : v0 + w.shape[0]]
        column = None if shift is None else shift.unsqueeze(1)  # (r, 1)
        if not self.low_precision:
            if b is None:
                return torch.mm(h, w.T) if column is None else torch.addmm(column, h, w.T)
            z = torch.addmm(b, h, w.T)  # (r, c)
            return z if column is None else z.add_(column)
        z = (h @ w.T).float()  # (r, c)
        if self.inv_temperature != 1.0:
            z.mul_(self.inv_temperature)
        if b is not None:
            z.add_(b)
        return z if column is None else z.add_(column)


def _target_slots(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows have their target in vocabulary chunk ``v0:v1``, and its column there."""
    in_chunk = (targets >= v0) & (targets < v1)  # (N,)
    local = (targets - v0).clamp_(0, v1 - v0 - 1).unsqueeze(1)  # (N, 1)
    return in_chunk, local


_ENTROPY_MAX_SUMEXP = math.exp(20.0)
"""With the entropy wanted, rows whose sum of exp(z - z_t) exceeds this are redone."""


@dataclass(frozen=True)
class TileOptions:
    """What one call of :class:`LMHeadLogps` computes, and with which tiles."""

    temperature: float = 1.0
    rows: int = 1  # rows of hidden states per tile
    cols: int = 1  # vocabulary columns per tile
    entropy: bool = False  # also return the entropy of each row
    entropy_grad: bool = True  # the entropy may receive a gradient (False: metrics only)
    argmax: bool = False  # also return the argmax of each row


@dataclass
class _ShiftedSums:
    """Per-row sums over the whole vocabulary of ``e = exp(z - c)`` for a per-row shift ``c``.

    ``project`` / ``project_weighted`` are the (N, H) products ``e @ W`` and
    ``(e * (z - c)) @ W``, accumulated only for the frozen-head path.
    """

    sumexp: torch.Tensor  # (N,) S = sum e
    weighted: torch.Tensor | None  # (N,) T = sum e * (z - c), for the entropy
    argmax: torch.Tensor | None  # (N,) long, first index of the row maximum
    project: torch.Tensor | None  # (N, H) float32
    project_weighted: torch.Tensor | None  # (N, H) float32

    @classmethod
    def zeros(cls, head: _Head, opts: TileOptions, project: bool) -> _ShiftedSums:
        n, dev = head.hidden.shape[0], head.hidden.device
        vec = lambda: torch.zeros(n, dtype=torch.float32, device=dev)  # noqa: E731
        mat = lambda: torch.zeros(n, head.hidden.shape[1], dtype=torch.float32, device=dev)  # noqa: E731
        return cls(
            vec(),
            vec() if opts.entropy else None,
            torch.zeros(n, dtype=torch.long, device=dev) if opts.argmax else None,
            mat() if project else None,
            mat() if project and opts.entropy and opts.entropy_grad else None,
        )

    def copy_rows(self, index: torch.Tensor, other: _ShiftedSums) -> None:
        """Overwrite rows ``index`` with the rows of ``other`` (same fields present)."""
        for name in ("sumexp", "weighted", "argmax", "project", "project_weighted"):
            mine = getattr(self, name)
            if mine is not None:
                mine.index_copy_(0, index, getattr(other, name))


def _project(acc: torch.Tensor, e: torch.Tensor, w: torch.Tensor) -> None:
    """``acc += e @ w`` with float32 accumulation, (r, c) @ (c, H)."""
    if w.dtype == torch.float32:
        acc.addmm_(e, w)
    else:
        acc += (e.to(w.dtype) @ w).float()


def _shifted_sums(
    head: _Head, shift: torch.Tensor, opts: TileOptions, project: bool
) -> _ShiftedSums:
    """One pass over all tiles accumulating :class:`_ShiftedSums`; ``shift`` is ``-c`` (N,)."""
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    sums = _ShiftedSums.zeros(head, opts, project)
    best = torch.full((n,), -math.inf, device=head.hidden.device) if opts.argmax else None  # (N,)
    for v0 in range(0, vocab, opts.cols):
        w = head.weight_chunk(v0, min(v0 + opts.cols, vocab))  # (c, H)
        for r0 in range(0, n, opts.rows):
            r1 = min(r0 + opts.rows, n)
            z = head.logits(r0, r1, w, v0, shift[r0:r1])  # (r, c) z - c
            if best is not None:
                tile_max, tile_arg = z.max(dim=1)  # (r,)
                better = tile_max > best[r0:r1]  # strict: the first index wins ties, as in torch.argmax
                best[r0:r1] = torch.where(better, tile_max, best[r0:r1])
                sums.argmax[r0:r1] = torch.where(better, tile_arg + v0, sums.argmax[r0:r1])
            e = z.exp_() if sums.weighted is None else torch.exp(z)  # (r, c)
            sums.sumexp[r0:r1] += e.sum(dim=1)
            if sums.project is not None:
                _project(sums.project[r0:r1], e, w)
            if sums.weighted is not None:
                e.mul_(z)  # e * (z - c)
                sums.weighted[r0:r1] += e.sum(dim=1)
                if sums.project_weighted is not None:
                    _project(sums.project_weighted[r0:r1], e, w)
    return sums


def _row_max(head: _Head, rows: int, cols: int) -> torch.Tensor:
    """Maximum logit of every row, float32 (N,)."""
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    out = torch.full((n,), -math.inf, dtype=torch.float32, device=head.hidden.device)
    for v0 in range(0, vocab, cols):
        w = head.weight_chunk(v0, min(v0 + cols, vocab))  # (c, H)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            torch.maximum(out[r0:r1], head.logits(r0, r1, w, v0, None).amax(dim=1), out=out[r0:r1])
    return out


@dataclass
class _Forward:
    """Results of the tiled forward, all float32 (N,) unless noted."""

    logps: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    argmax: torch.Tensor | None  # long
    probs_w: torch.Tensor | None  # (N, H) P @ W (frozen-head path)
    probs_logp_w: torch.Tensor | None  # (N, H) (P * log P) @ W (frozen-head path with entropy)


def _forward_tiles(head: _Head, targets: torch.Tensor, opts: TileOptions, project: bool) -> _Forward:
    """Tiled forward.

    Every row is shifted by its own target logit ``c = z_t``: no running maximum and no
    rescaling are needed, and ``logps = -log S``. ``exp(z - z_t)`` overflows only when a
    target is more than ~80 nats below the best token; such rows are redone, shifted by
    their exact row maximum (as are, when the entropy is wanted, rows whose target is
    more than ~20 nats below, to keep the entropy accurate).
    """
    z_t = head.target_logits(targets)  # (N,)
    shift = -z_t
    sums = _shifted_sums(head, shift, opts, project)
    redo = ~torch.isfinite(sums.sumexp)  # (N,) overflow
    if opts.entropy:
        # entropy = log S - T / S cancels: its error grows with the gap between the best token
        # and the target, so rows with a wide gap are redone close to the maximum too
        redo |= sums.sumexp > _ENTROPY_MAX_SUMEXP
    if bool(redo.any()):
        index = redo.nonzero().squeeze(1)
        sub = head.rows(index)
        sub_shift = -_row_max(sub, opts.rows, opts.cols)
        sums.copy_rows(index, _shifted_sums(sub, sub_shift, opts, project))
        shift = shift.index_copy(0, index, sub_shift)
    log_sum = sums.sumexp.log()
    lse = log_sum - shift  # (N,) c + log S
    entropy = None if sums.weighted is None else log_sum - sums.weighted / sums.sumexp
    probs_w = probs_logp_w = None
    if sums.project is not None:
        probs_w = sums.project / sums.sumexp.unsqueeze(1)  # (N, H)
        if sums.project_weighted is not None:  # sum p (z - c - log S) w
            probs_logp_w = sums.project_weighted / sums.sumexp.unsqueeze(1) - log_sum.unsqueeze(1) * probs_w
    return _Forward(z_t - lse, lse, entropy, sums.argmax, probs_w, probs_logp_w)


@dataclass
class _Upstream:
    """Gradients arriving at the op's outputs, prepared for the tile loop."""

    shift: torch.Tensor  # (N,) added to each row of the recomputed logits before exp
    sign: torch.Tensor  # (N,) the tile holds sign * (-dL/dz); see _backward_tiles
    onehot: torch.Tensor  # (N,) subtracted at the target column of the tile
    g_entropy: torch.Tensor | None  # (N,)
    coef: torch.Tensor | None  # (N,) g_logps + g_entropy * entropy

    @classmethod
    def build(
        cls, g_logps: torch.Tensor, g_entropy: torch.Tensor | None, lse: torch.Tensor, entropy: torch.Tensor | None
    ) -> _Upstream:
        if g_entropy is None:
            # tile = exp(z - lse + log|g|) - |g| e_t = |g| (p - e_t); the sign goes to (N, H) operands
            magnitude = g_logps.abs()
            log_mag = torch.where(magnitude > 0, magnitude.log(), torch.full_like(magnitude, -1e30))
            return cls(log_mag - lse, torch.sign(g_logps), magnitude, None, None)
        coef = g_logps + g_entropy * entropy
        return cls(-lse, torch.ones_like(g_logps), g_logps, g_entropy, coef)

    def tile(self, z: torch.Tensor, r0: int, r1: int, slots: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Turn the shifted logits tile into ``sign * (-dL/dz)`` in place.

        With ``p = softmax(z)``, ``logp = log p``, ``e_t`` the one-hot target and ``H`` the
        entropy: ``-dL/dz = p * (g_logps + g_entropy * (logp + H)) - g_logps * e_t``.
        """
        if self.g_entropy is None:
            d = z.exp_()  # |g| p
        else:
            p = torch.exp(z)  # z holds logp here
            d = z.mul_(self.g_entropy[r0:r1, None]).add_(self.coef[r0:r1, None]).mul_(p)
        in_chunk, local = slots
        hit = torch.where(in_chunk, -self.onehot[r0:r1], 0.0)  # (r,)
        return d.scatter_add_(1, local, hit.unsqueeze(1))


def _backward_tiles(
    head: _Head,
    targets: torch.Tensor,
    up: _Upstream,
    need: tuple[bool, bool, bool],
    rows: int,
    cols: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Tiled backward: float32 grad_hidden (N, H), grad_weight (V, H) in the weight's
    dtype and float32 grad_bias (V,), each None when not needed.

    With ``D`` a tile of ``sign * (-dL/dz)`` and ``s = 1/T``: ``grad_hidden = -s * sign *
    (D @ W)`` (accumulated unsigned, signed once at the end), ``grad_weight = D.T @ (-s *
    sign * hidden)`` and ``grad_bias = D.T @ (-s * sign)``.
    """
    h, weight = head.hidden, head.weight
    n, vocab = h.shape[0], weight.shape[0]
    f32 = torch.float32
    acc_h = torch.zeros(n, h.shape[1], dtype=f32, device=h.device) if need[0] else None  # (N, H)
    grad_w = torch.zeros_like(weight) if need[1] else None  # (V, H)
    grad_b = torch.zeros(vocab, dtype=f32, device=h.device) if need[2] else None  # (V,)
    h_signed = h * (-up.sign).to(h.dtype).unsqueeze(1) if need[1] else None  # (N, H)
    b_signed = -head.inv_temperature * up.sign  # (N,)
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        w = head.weight_chunk(v0, v1)  # (c, H)
        slots = _target_slots(targets, v0, v1)
        acc_w = None
        if grad_w is not None:
            acc_w = grad_w[v0:v1] if grad_w.dtype == f32 else torch.zeros(w.shape, dtype=f32, device=w.device)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            z = head.logits(r0, r1, w, v0, up.shift[r0:r1])  # (r, c)
            d = up.tile(z, r0, r1, (slots[0][r0:r1], slots[1][r0:r1]))
            _contract_tile(d, w, h_signed, r0, r1, acc_h, acc_w, head.grad_scale)
            if grad_b is not None:
                grad_b[v0:v1].addmv_(d.T, b_signed[r0:r1])
        if acc_w is not None and acc_w.data_ptr() != grad_w[v0:v1].data_ptr():
            grad_w[v0:v1].copy_(acc_w)
    grad_h = None if acc_h is None else acc_h.mul_((-head.inv_temperature * up.sign).unsqueeze(1))
    return grad_h, grad_w, grad_b


def _contract_tile(
    d: torch.Tensor,
    w: torch.Tensor,
    h_signed: torch.Tensor | None,
    r0: int,
    r1: int,
    acc_h: torch.Tensor | None,
    acc_w: torch.Tensor | None,
    w_scale: float,
) -> None:
    """Add one tile ``d`` (r, c) into the unsigned grad_hidden rows and the grad_weight rows."""
    if w.dtype == torch.float32:
        if acc_h is not None:
            acc_h[r0:r1].addmm_(d, w)
        if acc_w is not None:
            acc_w.addmm_(d.T, h_signed[r0:r1], alpha=w_scale)
        return
    d_low = d.to(w.dtype)  # 16-bit matmuls, float32 accumulation
    if acc_h is not None:
        acc_h[r0:r1] += (d_low @ w).float()
    if acc_w is not None:
        acc_w.add_((d_low.T @ h_signed[r0:r1]).float(), alpha=w_scale)


def _frozen_head_grad(
    weight: torch.Tensor,
    targets: torch.Tensor,
    saved: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    g_logps: torch.Tensor,
    g_entropy: torch.Tensor | None,
    inv_t: float,
) -> torch.Tensor:
    """grad_hidden (N, H) float32 from the products saved by the forward, without tiles.

    ``grad_hidden = -s * (coef * (P @ W) + g_entropy * ((P * log P) @ W) - g_logps * W[t])``
    with ``coef = g_logps + g_entropy * H`` and ``s = 1/T``.
    """
    entropy, probs_w, probs_logp_w = saved
    w_t = weight.index_select(0, targets).float()  # (N, H)
    if g_entropy is None:
        out = probs_w * g_logps.unsqueeze(1)
    else:
        coef = g_logps + g_entropy * entropy
        out = probs_w * coef.unsqueeze(1) + probs_logp_w * g_entropy.unsqueeze(1)
    return out.sub_(w_t * g_logps.unsqueeze(1)).mul_(-inv_t)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls would run in: the autocast dtype when autocast is on
    for the device (like an ``nn.Linear`` under autocast), else the promoted input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class LMHeadLogps(torch.autograd.Function):
    """Autograd function behind the chunked ops (see module docstring).

    ``apply(hidden, weight, bias, targets, options)`` with hidden (N, H), weight (V, H),
    bias (V,) or None, targets (N,) long in ``[0, V)`` and a :class:`TileOptions` returns
    ``(logps, entropy, argmax)``: float32 (N,), float32 (N,) or None, long (N,) or None.

    Saved for backward: the inputs and (N,) statistics. When only ``hidden`` needs a
    gradient (a frozen head, e.g. LoRA on the body), the forward also accumulates
    ``P @ W`` (and ``(P * log P) @ W`` if the entropy may get a gradient), two (N, H)
    products, and the backward needs no tiles at all.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        opts: TileOptions,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        inv_t = 1.0 / opts.temperature
        matmul_dtype = _matmul_dtype(hidden, weight)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        frozen_head = need_h and not need_w and not (bias is not None and need_b)
        with torch.autocast(hidden.device.type, enabled=False):
            head = _Head.build(hidden, weight, bias, inv_t, matmul_dtype)
            out = _forward_tiles(head, targets, opts, project=frozen_head)
        ctx.save_for_backward(hidden, weight, bias, targets, out.lse, out.entropy, out.probs_w, out.probs_logp_w)
        ctx.config = (inv_t, opts, matmul_dtype, frozen_head)
        ctx.set_materialize_grads(False)
        if out.argmax is not None:
            ctx.mark_non_differentiable(out.argmax)
        if out.entropy is not None and not opts.entropy_grad:
            ctx.mark_non_differentiable(out.entropy)
        return out.logps, out.entropy, out.argmax

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any,
        g_logps: torch.Tensor | None,
        g_entropy: torch.Tensor | None,
        _g_argmax: Any,
    ) -> tuple[Any, ...]:
        hidden, weight, bias, targets, lse, entropy, probs_w, probs_logp_w = ctx.saved_tensors
        inv_t, opts, matmul_dtype, frozen_head = ctx.config
        need = tuple(ctx.needs_input_grad[:3])
        if (g_logps is None and g_entropy is None) or not any(need):
            return (None,) * 5
        g_logps = torch.zeros_like(lse) if g_logps is None else g_logps.float()
        g_entropy = None if g_entropy is None or not opts.entropy_grad else g_entropy.float()
        if frozen_head:
            grad_h = _frozen_head_grad(weight, targets, (entropy, probs_w, probs_logp_w), g_logps, g_entropy, inv_t)
            return grad_h.to(hidden.dtype), None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            head = _Head.build(hidden, weight, bias, inv_t, matmul_dtype)
            up = _Upstream.build(g_logps, g_entropy, lse, entropy)
            grad_h, grad_w, grad_b = _backward_tiles(head, targets, up, need, opts.rows, opts.cols)  # type: ignore[arg-type]
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None
