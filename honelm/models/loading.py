"""Loading models from a name or path the way users expect from ``from_pretrained``."""

from __future__ import annotations

from typing import Any

import torch


def resolve_dtype(value: Any) -> Any:
    """``"bfloat16"`` / ``"torch.float16"`` / ``"auto"`` / a ``torch.dtype`` -> what ``from_pretrained`` takes."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(
        f"model_init_kwargs: dtype={value!r} is not a torch dtype. Use 'auto', 'bfloat16', 'float16' or 'float32'."
    )


def load_causal_lm(name_or_path: str, model_init_kwargs: dict[str, Any] | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto", **model_init_kwargs)``.

    ``torch_dtype`` (the older spelling) is accepted as ``dtype``; dtype strings are converted.
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_init_kwargs or {})
    if "torch_dtype" in kwargs:
        if "dtype" in kwargs:
            raise ValueError("model_init_kwargs: give either `dtype` or `torch_dtype`, not both.")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    kwargs["dtype"] = resolve_dtype(kwargs.get("dtype", "auto"))
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
