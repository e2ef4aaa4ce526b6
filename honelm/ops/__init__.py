"""Pure tensor ops for post-training losses: log-probs, entropy and cross-entropy of
chosen tokens computed chunk by chunk from the final hidden states and the LM head, so
that the ``(tokens, vocab)`` logits are never held in memory.

    from honelm.ops import lm_head_weight_and_bias, selective_logps

    weight, bias = lm_head_weight_and_bias(model)
    logps = selective_logps(hidden, weight, targets, bias)   # (N,) float32
"""

from __future__ import annotations

from ._kernel import auto_chunk_size, auto_vocab_chunk_size
from .cross_entropy import chunked_cross_entropy
from .lm_head import lm_head_weight_and_bias
from .logps import masked_selective_logps, selective_logps

__all__ = [
    "auto_chunk_size",
    "auto_vocab_chunk_size",
    "chunked_cross_entropy",
    "lm_head_weight_and_bias",
    "masked_selective_logps",
    "selective_logps",
]
