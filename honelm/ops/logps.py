"""Log-probs (and entropy) of chosen tokens straight from hidden states and the LM head.

``selective_logps(hidden, weight, targets)`` equals
``torch.log_softmax((hidden @ weight.T + bias) / temperature, -1).gather(-1, targets[..., None])``
but never holds the ``(tokens, vocab)`` logits, neither in forward nor in backward: see
:mod:`honelm.ops._kernel` for how.
"""

from __future__ import annotations

import torch

from ._checks import check_head, check_target_range, check_targets, check_temperature, plan_tiles
from ._kernel import LMHeadLogps, TileOptions


def selective_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: final hidden states, shape ``(N, H)`` or more generally ``(..., H)``.
        weight: LM head weight ``(V, H)`` (see :func:`lm_head_weight_and_bias`).
        targets: token ids ``(N,)`` (or ``(...)``) in ``[0, V)``, aligned with ``hidden``:
            row ``i`` scores ``targets[i]``, so shift labels beforehand.
        bias: optional LM head bias ``(V,)``.
        temperature: logits are divided by it (sampling temperature of the rollouts).
        chunk_size: rows of ``hidden`` per tile; ``None`` picks it from the shapes
            (:func:`auto_chunk_size`).
        vocab_chunk_size: vocabulary columns per tile; ``None`` picks it so that a tile
            fits the default budget (:func:`auto_vocab_chunk_size`).
        return_entropy: also return the entropy of each row's distribution, with a
            correct gradient (for entropy bonuses).

    Returns:
        ``logps`` float32 of shape ``targets.shape``, or ``(logps, entropy)`` when
        ``return_entropy``. Gradients flow to ``hidden``, ``weight`` and ``bias`` in their
        own dtypes; softmax statistics and gradient accumulation run in float32.
    """
    fn = "selective_logps"
    check_head(fn, hidden, weight, bias)
    check_targets(fn, "targets", targets, hidden)
    temperature = check_temperature(fn, temperature)
    flat_targets = targets.reshape(-1).long()  # (N,)
    vocab = weight.shape[0]
    check_target_range(fn, "targets", flat_targets, None, targets.shape, vocab,
                       " Mask such positions out with `masked_selective_logps`.")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    rows, cols = plan_tiles(fn, flat_hidden.shape[0], vocab, hidden.dtype, chunk_size, vocab_chunk_size)
    opts = TileOptions(temperature, rows, cols, entropy=return_entropy)
    logps, entropy, _ = LMHeadLogps.apply(flat_hidden, weight, bias, flat_targets, opts)
    logps = logps.view(targets.shape)
    if return_entropy:
        return logps, entropy.view(targets.shape)
    return logps


def masked_selective_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_logps` for padded batches: only positions where ``mask`` is set
    go through the LM head; the others get 0 and no gradient.

    Args:
        hidden: ``(B, T, H)`` (any leading shape works).
        weight: LM head weight ``(V, H)``.
        targets: ``(B, T)`` token ids; entries where ``mask`` is false are ignored and
            may hold anything (padding, ``-100``).
        mask: ``(B, T)``, true (nonzero) where a log-prob is wanted, e.g. ``completion_mask``.
        bias, temperature, chunk_size, vocab_chunk_size, return_entropy: as in
            :func:`selective_logps`.

    Returns:
        ``logps`` float32 ``(B, T)`` with zeros where ``mask`` is false, or
        ``(logps, entropy)`` when ``return_entropy``.
    """
    fn = "masked_selective_logps"
    check_head(fn, hidden, weight, bias)
    check_targets(fn, "targets", targets, hidden)
    if not isinstance(mask, torch.Tensor) or mask.shape != targets.shape or mask.device != targets.device:
        got = f"{tuple(mask.shape)} on {mask.device}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{fn}: `mask` must have the shape of `targets` {tuple(targets.shape)} and be on {targets.device}, "
            f"got {got}."
        )
    temperature = check_temperature(fn, temperature)
    positions = mask.reshape(-1).nonzero().squeeze(1)  # (n,) flat indices of kept positions
    kept_targets = targets.reshape(-1).index_select(0, positions).long()  # (n,)
    vocab = weight.shape[0]
    check_target_range(fn, "targets", kept_targets, positions, targets.shape, vocab,
                       " That position is inside `mask`; fix the targets or mask it out.")
    kept_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (n, H)
    rows, cols = plan_tiles(fn, kept_hidden.shape[0], vocab, hidden.dtype, chunk_size, vocab_chunk_size)
    opts = TileOptions(temperature, rows, cols, entropy=return_entropy)
    logps, entropy, _ = LMHeadLogps.apply(kept_hidden, weight, bias, kept_targets, opts)
    logps = _scatter_back(logps, positions, targets.shape)
    if return_entropy:
        return logps, _scatter_back(entropy, positions, targets.shape)
    return logps


def _scatter_back(values: torch.Tensor, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Place ``values`` (n,) at flat ``positions`` of a zero tensor of ``shape``."""
    out = values.new_zeros(shape.numel())  # (B*T,)
    return out.index_copy(0, positions, values).view(shape)
