"""Fused cross-entropy: loss and gradients from one pass over row chunks of the logits.

When the loss is a plain sum of token cross-entropies, the gradient arriving at it is a
single scalar ``g``, so ``dL/dz = g * (softmax(z) - onehot)`` is known up to that scalar
while the forward pass still holds each logits tile. The forward therefore computes, for
each chunk of rows over the *whole* vocabulary, the logits (one matmul), the loss terms
and the statistics, and turns the same tile into the gradients of the hidden states and
the weight (two matmuls). The backward only multiplies the stored gradients by ``g``.

That is three logits-sized matmuls per step, as many as the naive computation and one
fewer than recomputing the tiles in the backward, while memory stays at one
``(rows, vocab)`` tile plus the gradients themselves.
"""

from __future__ import annotations

from typing import Any

import torch

from ._kernel import _low_precision_matmul, _matmul_dtype

FUSED_BUDGET_BYTES = 128 * 2**20
"""Float32 bytes of one ``(rows, vocab)`` tile of the fused path."""


def fused_rows(num_rows: int, vocab_size: int, budget_bytes: int = FUSED_BUDGET_BYTES) -> int:
    """Rows per chunk so that a float32 ``(rows, vocab)`` tile fits ``budget_bytes``."""
    return max(1, min(num_rows, budget_bytes // (4 * max(vocab_size, 1))))


def operand_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the fused path multiplies in: the autocast or input dtype when it is 16-bit
    and the device multiplies it natively (as the tiled kernel decides), else float32."""
    dtype = _matmul_dtype(hidden, weight)
    return dtype if _low_precision_matmul(hidden.device, dtype) else torch.float32


class FusedCrossEntropySum(torch.autograd.Function):
    """``apply(hidden (N, H), weight (V, H), bias (V,) | None, labels (N,), rows, want_stats)``
    returns ``(loss_sum, num_correct, entropy_sum)``: the summed cross-entropy (float32, 0-dim,
    differentiable) and two detached statistics (zeros unless ``want_stats``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        rows: int,
        want_stats: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = operand_dtype(hidden, weight)  # matmul operands; products are float32
        f32 = torch.float32
        grad_h = torch.empty(n, hidden.shape[1], dtype=f32, device=hidden.device) if need_h else None  # (N, H)
        grad_w = torch.zeros(vocab, weight.shape[1], dtype=f32, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(vocab, dtype=f32, device=weight.device) if need_b else None  # (V,)
        loss = torch.zeros((), dtype=f32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        entropy = torch.zeros((), dtype=f32, device=hidden.device)
        w_t = weight.T.to(dtype)  # (H, V)
        w_op = weight.to(dtype) if need_h else None  # (V, H)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                h = hidden[r0:r1].to(dtype)  # (r, H)
                y = labels[r0:r1].unsqueeze(1)  # (r, 1)
                z = (h @ w_t).float()  # (r, V) logits
                if bias is not None:
                    z += bias.float()
                z_max, z_arg = z.max(dim=1)  # (r,) one pass gives both
                z_t = z.gather(1, y).squeeze(1)  # (r,)
                z.sub_(z_max.unsqueeze(1))  # shifted logits, <= 0
                if want_stats:
                    correct += (z_arg == y.squeeze(1)).sum()
                    e = torch.exp(z)  # (r, V); z is still needed for the entropy
                    total = e.sum(dim=1)  # (r,)
                    # H = log S - sum_v e (z - max) / S
                    e_dot_z = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # (r,) row dots, no temporary
                    entropy += (total.log() - e_dot_z / total).sum()
                    del z
                else:
                    e = z.exp_()  # in place
                    total = e.sum(dim=1)
                loss += (z_max + total.log() - z_t).sum()  # lse - z_t
                p = e.mul_(total.reciprocal().unsqueeze(1))  # (r, V) softmax
                p.scatter_add_(1, y, torch.full((r1 - r0, 1), -1.0, device=p.device))  # p - onehot
                if dtype == f32:
                    if grad_h is not None:
                        torch.mm(p, w_op, out=grad_h[r0:r1])
                    if grad_w is not None:
                        grad_w.addmm_(p.T, h)
                else:
                    p16 = p.to(dtype)  # one 16-bit copy of the tile serves both products
                    if grad_h is not None:
                        grad_h[r0:r1] = p16 @ w_op  # upcast on assignment
                    if grad_w is not None:
                        grad_w += p16.T @ h  # 16-bit product, accumulated in float32
                    del p16
                if grad_b is not None:
                    grad_b += p.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct, entropy)
        return loss, correct, entropy

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if g_loss is None:
            return None, None, None, None, None, None
        g = g_loss.float()
        out_h = None if grad_h is None else (grad_h * g).to(h_dtype)
        out_w = None if grad_w is None else (grad_w * g).to(w_dtype)
        out_b = None if grad_b is None else (grad_b * g).to(b_dtype)
        return out_h, out_w, out_b, None, None, None

