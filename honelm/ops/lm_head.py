"""Resolve the effective ``(weight, bias)`` of a causal LM's output layer.

The chunked ops take the LM head as tensors. ``lm_head_weight_and_bias(model)`` returns
tensors such that ``hidden @ weight.T + bias`` equals the model's logits, built with
differentiable ops so that gradients reach every parameter behind them:

* plain ``nn.Linear`` head: its own ``weight`` / ``bias`` parameters;
* tied embeddings: the weight *is* the input-embedding parameter, so the head's gradient
  accumulates into the one shared parameter;
* PEFT LoRA on the head: ``W + sum_a scaling_a * B_a @ A_a`` over the active, unmerged
  adapters (gradients reach ``lora_A`` / ``lora_B``), following PEFT's own forward for
  disabled adapters (``disable_adapter()``) and merged adapters;
* PEFT ``modules_to_save`` head: the copy of the active adapter (or the original);
* logit scaling applied by some architectures after the head (Cohere ``logit_scale``,
  Granite ``logits_scaling``) is folded into the returned weight and bias.

PEFT is imported only when it is already loaded (a PEFT layer cannot exist otherwise).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn


def lm_head_weight_and_bias(model_or_module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Effective ``(weight (V, H), bias (V,) or None)`` of a model's output layer.

    Args:
        model_or_module: a transformers causal LM (``get_output_embeddings()`` is used),
            a PEFT model wrapping one, or the output layer itself (``nn.Linear`` or a
            PEFT layer wrapping one).

    Returns:
        Tensors connected to the model's parameters by autograd; pass them to
        :func:`selective_logps` / :func:`chunked_cross_entropy`. Call it inside the
        training step (not once up front): LoRA and scaled heads build a new tensor from
        the current parameters on every call.

    Raises:
        ValueError: the model has no output layer, or applies a non-linear transform to
            its logits (final logit soft-capping) that the chunked ops cannot reproduce.
        NotImplementedError: the head is wrapped by a PEFT method other than plain LoRA
            (DoRA and other LoRA variants, trainable tokens, other tuners).
        TypeError: the head is not a linear layer with a floating-point weight.
    """
    if hasattr(model_or_module, "get_output_embeddings"):
        head = model_or_module.get_output_embeddings()
        if head is None:
            raise ValueError(
                f"{type(model_or_module).__name__}.get_output_embeddings() returned None: this model has no "
                "LM head. Load it with AutoModelForCausalLM, or pass the output layer itself."
            )
        multiplier = _logit_multiplier(model_or_module)
    else:
        head, multiplier = model_or_module, 1.0
    weight, bias = _resolve(head)
    if multiplier != 1.0:
        weight = weight * multiplier
        bias = None if bias is None else bias * multiplier
    return weight, bias


def _logit_multiplier(model: nn.Module) -> float:
    """Factor some architectures apply to the head's output; raise for non-linear ones."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (config.final_logit_softcapping={softcap}): "
            "logits = cap * tanh(logits / cap) is not linear in the head, so the chunked ops would "
            "compute wrong log-probs. Compute log-probs from the model's logits for this model."
        )
    multiplier = 1.0
    scale = getattr(model, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        multiplier *= float(scale)
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling != 1:
        multiplier /= float(scaling)
    return multiplier


def _resolve(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a head module, unwrapping PEFT layers."""
    peft_types = _peft_types()
    if peft_types is not None:
        lora_layer, modules_to_save, trainable_tokens, base_tuner = peft_types
        if isinstance(head, lora_layer):
            return _resolve_lora(head)
        if modules_to_save is not None and isinstance(head, modules_to_save):
            use_original = head.disable_adapters or not head.active_adapters
            return _resolve(head.original_module if use_original else head.modules_to_save[head.active_adapters[0]])
        if trainable_tokens is not None and isinstance(head, trainable_tokens):
            raise NotImplementedError(
                "The LM head is wrapped by PEFT trainable tokens (trainable_token_indices); the chunked ops do "
                "not support it. Drop trainable_token_indices for the head, or use the model's logits."
            )
        if isinstance(head, base_tuner):
            raise NotImplementedError(
                f"The LM head is wrapped by the PEFT layer {type(head).__name__}; only plain LoRA is supported "
                "by the chunked ops. Leave lm_head out of target_modules, or use the model's logits."
            )
    return _linear_params(head)


def _linear_params(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        found = f"{type(head).__name__} with weight {_describe(weight)}"
        raise TypeError(
            f"The LM head must be an nn.Linear with a floating-point weight (vocab_size, hidden_size); found "
            f"{found}. Quantized or custom heads are not supported by the chunked ops."
        )
    return weight, head.bias


def _resolve_lora(layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Effective weight and bias of a PEFT LoRA layer, mirroring ``peft``'s Linear forward."""
    weight, bias = _linear_params(layer.get_base_layer())
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError("LoRA with fan_in_fan_out=True on the LM head is not supported.")
    if layer.disable_adapters:
        # PEFT unmerges merged adapters and runs the base layer; undo them without touching the weights.
        for name in layer.merged_adapters:
            dw, db = _lora_delta(layer, name, weight.dtype)
            weight = weight - dw.detach()
            bias = bias if db is None else _add_bias(bias, -db.detach())
        return weight, bias
    if layer.merged:
        return weight, bias  # PEFT runs the base layer alone: it already holds the merged adapters
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        _check_plain_lora(layer, name)
        dw, db = _lora_delta(layer, name, weight.dtype)
        weight = weight + dw
        bias = bias if db is None else _add_bias(bias, db)
    return weight, bias


def _lora_delta(layer: Any, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scaling * B @ A`` (V, H) in ``dtype``, and ``scaling * B.bias`` (V,) when LoRA has a bias."""
    lora_a, lora_b, scaling = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    delta_w = (lora_b.weight @ lora_a.weight) * scaling  # (V, H)
    has_bias = bool(getattr(layer, "lora_bias", {}).get(name, False)) and lora_b.bias is not None
    delta_b = lora_b.bias * scaling if has_bias else None  # (V,)
    return delta_w.to(dtype), None if delta_b is None else delta_b.to(dtype)


def _add_bias(bias: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    return delta if bias is None else bias + delta.to(bias.dtype)


def _check_plain_lora(layer: Any, name: str) -> None:
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None or getattr(layer, "use_dora", {}).get(name, False):
        kind = type(variant).__name__ if variant is not None else "DoRA"
        raise NotImplementedError(
            f"LoRA adapter {name!r} on the LM head uses the variant {kind}, which is not a plain low-rank "
            "update of the weight; the chunked ops support plain LoRA only. Leave lm_head out of "
            "target_modules, or use the model's logits."
        )
    dropout = layer.lora_dropout[name]
    if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        warnings.warn(
            f"LoRA adapter {name!r} on the LM head has lora_dropout={dropout.p}; the chunked ops use the "
            "effective weight W + scaling * B @ A and so apply no dropout on the head. Set lora_dropout=0 "
            "or leave lm_head out of target_modules to silence this.",
            UserWarning,
            stacklevel=4,
        )


def _peft_types() -> tuple[type, type | None, type | None, type] | None:
    """PEFT classes to unwrap, or None when PEFT has not been imported."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - depends on the installed peft version
        ModulesToSaveWrapper = None  # noqa: N806
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:  # pragma: no cover - depends on the installed peft version
        TrainableTokensWrapper = None  # noqa: N806
    return LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper, BaseTunerLayer


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
