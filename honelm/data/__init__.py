"""Data pipeline: dataset formats, chat templates and masks, packing, collators.

A dataset row flows through :func:`validate_dataset` / :func:`detect_format` (which format,
and is every row well formed?), then :func:`tokenize_dataset` (chat template, token ids,
``completion_mask`` / ``assistant_masks``, truncation), then packing or collation.

Names are imported on first use, so ``import honelm.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # errors
    "ChatTemplateError": "honelm.data.errors",
    "DatasetFormatError": "honelm.data.errors",
    # formats
    "ALLOWED_ROLES": "honelm.data.formats",
    "KINDS": "honelm.data.formats",
    "DatasetFormat": "honelm.data.formats",
    "detect_format": "honelm.data.formats",
    "extract_prompt": "honelm.data.formats",
    "is_conversational": "honelm.data.formats",
    "unpair_preference": "honelm.data.formats",
    "unpair_preference_dataset": "honelm.data.formats",
    "validate_dataset": "honelm.data.formats",
    "validate_row": "honelm.data.formats",
    "validate_stream": "honelm.data.formats",
    # templates
    "TRUNCATION_MODES": "honelm.data.templates",
    "TruncationStats": "honelm.data.templates",
    "apply_formatting_func": "honelm.data.templates",
    "has_generation_markers": "honelm.data.templates",
    "tokenize_dataset": "honelm.data.templates",
    "tokenize_row": "honelm.data.templates",
    "truncate_row": "honelm.data.templates",
    # packing and collation
    "PACKING_STRATEGIES": "honelm.data.packing",
    "pack_dataset": "honelm.data.packing",
    "DataCollatorForLanguageModeling": "honelm.data.collators",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'honelm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from .collators import DataCollatorForLanguageModeling
    from .errors import ChatTemplateError, DatasetFormatError
    from .formats import (
        ALLOWED_ROLES,
        KINDS,
        DatasetFormat,
        detect_format,
        extract_prompt,
        is_conversational,
        unpair_preference,
        unpair_preference_dataset,
        validate_dataset,
        validate_row,
        validate_stream,
    )
    from .packing import PACKING_STRATEGIES, pack_dataset
    from .templates import (
        TRUNCATION_MODES,
        TruncationStats,
        apply_formatting_func,
        has_generation_markers,
        tokenize_dataset,
        tokenize_row,
        truncate_row,
    )
