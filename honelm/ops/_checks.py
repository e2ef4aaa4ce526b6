"""Input validation shared by the ops: errors that name what was found and how to fix it."""

from __future__ import annotations

import math

import torch

from ._kernel import auto_chunk_size, auto_vocab_chunk_size


def check_head(fn: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Check shapes, dtypes and devices of the LM-head operands."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError(f"{fn}: `hidden` must be a tensor of shape (..., hidden_size), got {_describe(hidden)}.")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{fn}: `weight` must be the LM head weight of shape (vocab_size, hidden_size), got "
            f"{_describe(weight)}. Use `lm_head_weight_and_bias(model)` to get it from a model."
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: hidden size mismatch: `hidden` has last dimension {hidden.shape[-1]} but `weight` "
            f"has shape {tuple(weight.shape)} (vocab_size, hidden_size). Pass the final hidden states "
            "of the model (after the last norm) and the weight of its output layer."
        )
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not t.is_floating_point():
            raise TypeError(f"{fn}: `{name}` must be a floating point tensor, got dtype {t.dtype}.")
    if weight.device != hidden.device:
        raise ValueError(
            f"{fn}: `hidden` is on {hidden.device} but `weight` is on {weight.device}; move them to one device."
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{fn}: `bias` must have shape ({weight.shape[0]},) to match `weight` "
                f"{tuple(weight.shape)}, got {_describe(bias)}."
            )
        if bias.device != hidden.device:
            raise ValueError(f"{fn}: `bias` is on {bias.device} but `hidden` is on {hidden.device}.")


def check_targets(fn: str, name: str, targets: torch.Tensor, hidden: torch.Tensor) -> None:
    """Check that ``targets`` are integer ids shaped like ``hidden`` minus its last dimension,
    on its device (the range is checked separately)."""
    lead_shape = hidden.shape[:-1]
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: `{name}` must be an integer tensor of token ids, got {_describe(targets)}.")
    if targets.device != hidden.device:
        raise ValueError(f"{fn}: `{name}` is on {targets.device} but `hidden` is on {hidden.device}.")
    if targets.shape != lead_shape:
        raise ValueError(
            f"{fn}: `{name}` has shape {tuple(targets.shape)} but `hidden` has shape "
            f"{tuple(lead_shape)} + (hidden_size,); they must agree on every dimension but the last. "
            "Shift labels before calling (position t predicts token t + 1)."
        )


def check_target_range(fn: str, name: str, ids: torch.Tensor, positions: torch.Tensor | None,
                       shape: torch.Size, vocab_size: int, hint: str = "") -> None:
    """Raise if any id in ``ids`` (1-D) is outside ``[0, vocab_size)``, naming its position.

    ``positions`` maps entries of ``ids`` back to flat positions in a tensor of ``shape``
    (None when ``ids`` is that tensor flattened).
    """
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    flat = first if positions is None else int(positions[first])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape))) if shape else ()
    raise ValueError(
        f"{fn}: `{name}` at position {where} is {int(ids[first])}, outside the vocabulary "
        f"[0, {vocab_size}) ({int(bad.sum())} such entries in all).{hint}"
    )


def check_temperature(fn: str, temperature: float) -> float:
    """Return ``temperature`` as a float after checking it is finite and positive."""
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{fn}: `temperature` must be a finite number > 0, got {temperature!r}.")
    return t


def plan_tiles(fn: str, num_rows: int, vocab_size: int, dtype: torch.dtype,
               chunk_size: int | None, vocab_chunk_size: int | None) -> tuple[int, int]:
    """Resolve (rows, cols) of a tile from the user's choices or automatically."""
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{fn}: `{name}` must be a positive int or None (automatic), got {value!r}.")
    rows = chunk_size if chunk_size is not None else auto_chunk_size(num_rows, vocab_size, dtype)
    if vocab_chunk_size is None:
        vocab_chunk_size = auto_vocab_chunk_size(rows, vocab_size, dtype)
    return rows, min(vocab_chunk_size, vocab_size)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"
