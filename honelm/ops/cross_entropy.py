"""Token-level cross-entropy for SFT straight from hidden states and the LM head."""

from __future__ import annotations

import numbers

import torch

from ._fused_ce import FusedCrossEntropySum, fused_rows
from ._checks import check_head, check_target_range, check_targets, plan_tiles
from ._kernel import LMHeadLogps, TileOptions

_REDUCTIONS = ("mean", "sum", "none")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of ``labels`` under ``softmax(hidden @ weight.T + bias)``, chunk by chunk.

    Positions whose label is ``ignore_index`` are dropped before the LM head: they cost
    nothing, contribute zero loss and receive zero gradient.

    Args:
        hidden: final hidden states ``(..., H)``, e.g. ``(B, T, H)``.
        weight: LM head weight ``(V, H)`` (see :func:`lm_head_weight_and_bias`).
        labels: ``(...)`` token ids aligned with ``hidden`` (already shifted: row ``i``
            is scored against ``labels[i]``), ``ignore_index`` where there is no target.
        bias: optional LM head bias ``(V,)``.
        ignore_index: label value that marks positions without a target.
        reduction: ``"mean"`` (over valid tokens, or over ``num_items_in_batch``),
            ``"sum"``, or ``"none"`` (per-position loss of ``labels.shape``, 0 where ignored).
        num_items_in_batch: with ``reduction="mean"``, divide the summed loss by this
            number (int, float or 0-dim tensor) instead of this batch's valid-token count;
            ``transformers.Trainer`` passes it to normalize across gradient accumulation.
        chunk_size, vocab_chunk_size: tile shape, automatic by default (see
            :func:`selective_logps`).
        return_stats: also return a dict of detached metrics computed from the same
            tiles: ``num_tokens`` (valid tokens, long), ``num_correct`` (valid tokens whose
            argmax equals the label, long) and ``entropy_sum`` (float32 sum of the
            per-token entropies). Accuracy is ``num_correct / num_tokens``.

    Returns:
        The loss (float32), or ``(loss, stats)`` when ``return_stats``. With no valid
        token the loss is 0 (and so is its gradient).
    """
    fn = "chunked_cross_entropy"
    check_head(fn, hidden, weight, bias)
    check_targets(fn, "labels", labels, hidden)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: `reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            f"{fn}: `num_items_in_batch` replaces the denominator of reduction='mean'; it makes no "
            f"sense with reduction={reduction!r}. Pass reduction='mean' or drop num_items_in_batch."
        )
    positions = (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)  # (n,) valid flat positions
    kept_labels = labels.reshape(-1).index_select(0, positions).long()  # (n,)
    vocab = weight.shape[0]
    check_target_range(fn, "labels", kept_labels, positions, labels.shape, vocab,
                       f" Use ignore_index={ignore_index} for positions without a target.")
    kept_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (n, H)
    if reduction != "none" and vocab_chunk_size is None and _needs_grad(kept_hidden, weight, bias):
        # Summed loss: its gradient is one scalar, so the fused path computes the gradients
        # from the forward's own tiles (three logits-sized matmuls instead of four).
        rows = chunk_size or fused_rows(kept_hidden.shape[0], vocab)
        loss, num_correct, entropy_sum = FusedCrossEntropySum.apply(
            kept_hidden, weight, bias, kept_labels, rows, return_stats
        )
        if reduction == "mean":
            loss = loss / _denominator(fn, num_items_in_batch, positions.numel(), loss.device)
        if not return_stats:
            return loss
        num_tokens = torch.tensor(positions.numel(), dtype=torch.long, device=loss.device)
        return loss, {"num_tokens": num_tokens, "num_correct": num_correct, "entropy_sum": entropy_sum}
    rows, cols = plan_tiles(fn, kept_hidden.shape[0], vocab, hidden.dtype, chunk_size, vocab_chunk_size)
    # the entropy and argmax are metrics only: no gradient flows through them
    opts = TileOptions(1.0, rows, cols, entropy=return_stats, entropy_grad=False, argmax=return_stats)
    logps, entropy, argmax = LMHeadLogps.apply(kept_hidden, weight, bias, kept_labels, opts)
    token_loss = -logps  # (n,)
    if reduction == "none":
        loss = token_loss.new_zeros(labels.numel()).index_copy(0, positions, token_loss).view(labels.shape)
    elif reduction == "sum":
        loss = token_loss.sum()
    else:
        loss = token_loss.sum() / _denominator(fn, num_items_in_batch, positions.numel(), token_loss.device)
    if not return_stats:
        return loss
    stats = {
        "num_tokens": torch.tensor(positions.numel(), dtype=torch.long, device=token_loss.device),
        "num_correct": (argmax == kept_labels).sum(),
        "entropy_sum": entropy.detach().sum(),
    }
    return loss, stats


def _needs_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)


def _denominator(
    fn: str, num_items_in_batch: int | float | torch.Tensor | None, num_valid: int, device: torch.device
) -> torch.Tensor | float:
    """Divisor of the summed loss for reduction='mean'; 1 when it would be 0 (the sum is 0 then)."""
    if num_items_in_batch is None:
        return float(max(num_valid, 1))
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"{fn}: `num_items_in_batch` must be a number or a 1-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}."
            )
        denom = num_items_in_batch.reshape(()).to(device=device, dtype=torch.float32)
        return torch.where(denom > 0, denom, torch.ones_like(denom))
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"{fn}: `num_items_in_batch` must be a number or a tensor, got {num_items_in_batch!r}.")
    if num_items_in_batch < 0 or (num_items_in_batch == 0 and num_valid > 0):
        raise ValueError(
            f"{fn}: `num_items_in_batch` is {num_items_in_batch} but this batch alone has {num_valid} "
            "valid tokens; it must count the valid tokens of all accumulated batches."
        )
    return float(num_items_in_batch) if num_items_in_batch > 0 else 1.0
