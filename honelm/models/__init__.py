"""Model loading and the forward passes shared by the trainers."""

from __future__ import annotations

from .forward import last_hidden_states
from .loading import load_causal_lm, resolve_dtype

__all__ = ["last_hidden_states", "load_causal_lm", "resolve_dtype"]
