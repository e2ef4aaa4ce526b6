"""Run a causal LM to its final hidden states without computing the (tokens, vocab) logits."""

from __future__ import annotations

from typing import Any

import torch


def last_hidden_states(model: Any, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """Forward ``model`` and return ``(hidden, outputs)``: the final (normed) hidden states.

    The whole model is called (not just its decoder), so wrappers that hook its forward
    (DDP, FSDP, DeepSpeed, PEFT) and mixture-of-experts auxiliary losses keep working.
    ``logits_to_keep`` is an empty index, so the LM head runs on zero positions and no logits
    are materialized: losses go through :mod:`honelm.ops` instead.

    ``use_cache=False`` is forced: with a KV cache transformers does not detect the sequence
    boundaries of padding-free batches and attention would cross them.

    Returns:
        ``hidden`` of shape ``(B, T, H)`` and the model outputs (``aux_loss`` for MoE models).
    """
    device = inputs["input_ids"].device
    outputs = model(
        **inputs,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=torch.empty(0, dtype=torch.long, device=device),
    )
    hidden = outputs.hidden_states[-1]  # (B, T, H)
    return hidden, outputs
