"""Tiny randomly initialized models from the real transformers classes."""

from __future__ import annotations

import os
from typing import Any

from .tokenizer import tiny_tokenizer

# Per-architecture settings on top of the common decoder fields. Each keeps the model at a
# few hundred thousand parameters while exercising what makes the family distinct
# (grouped-query attention, q/k norms, mixture-of-experts routing, tied embeddings).
_ARCH_EXTRAS: dict[str, dict[str, Any]] = {
    "qwen2": {},
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "output_router_logits": True,
        "router_aux_loss_coef": 0.01,
    },
    "qwen3_moe": {
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "output_router_logits": True,
        "router_aux_loss_coef": 0.01,
    },
    "mixtral": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "output_router_logits": True,
        "router_aux_loss_coef": 0.01,
    },
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(_ARCH_EXTRAS)
_TASKS = ("causal-lm", "sequence-classification")


def tiny_config(arch: str = "qwen2", tokenizer: Any = None, **overrides: Any) -> Any:
    """The transformers config of a tiny ``arch`` model sized to ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig

    if arch not in _ARCH_EXTRAS:
        raise ValueError(
            f"tiny_config: unknown arch {arch!r}. Supported: {', '.join(SUPPORTED_ARCHS)}."
        )
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    fields.update(_ARCH_EXTRAS[arch])
    fields.update(overrides)
    return AutoConfig.for_model(arch, **fields)


def tiny_model(
    arch: str = "qwen2",
    task: str = "causal-lm",
    *,
    seed: int = 0,
    tokenizer: Any = None,
    save_to: str | os.PathLike[str] | None = None,
    dtype: Any = None,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> tuple[Any, Any]:
    """Build a randomly initialized tiny model and its tokenizer, entirely offline.

    Args:
        arch: One of :data:`SUPPORTED_ARCHS` (``"qwen2"``, ``"llama"``, ``"qwen2_moe"``, ...).
        task: ``"causal-lm"`` or ``"sequence-classification"`` (one output, for reward models).
        seed: Weights are a deterministic function of ``seed``; the global RNG is untouched.
        tokenizer: Defaults to :func:`tiny_tokenizer`; the vocabulary is sized to it.
        save_to: When given, the model and tokenizer are saved there so that
            ``AutoModelForCausalLM.from_pretrained(save_to)`` and
            ``AutoTokenizer.from_pretrained(save_to)`` work exactly as with a hub model.
        dtype: Optional ``torch.dtype`` for the parameters (default float32).
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ...
        **config_overrides: Any config field (``hidden_size``, ``num_hidden_layers``, ...).

    Returns:
        ``(model, tokenizer)``, the model in train mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in _TASKS:
        raise ValueError(f"tiny_model: unknown task {task!r}. Expected one of {_TASKS}.")
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    if task == "sequence-classification":
        config_overrides.setdefault("num_labels", 1)
    config = tiny_config(arch, tokenizer, **config_overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    auto_cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.train()
    if save_to is not None:
        model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    return model, tokenizer
