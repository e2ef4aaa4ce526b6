"""honelm: post-training for language models.

The names exported here are the stable API (see STABILITY.md). They are listed
explicitly and imported lazily, so ``import honelm`` stays fast: nothing heavy
(torch, transformers) is imported until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# name -> module that defines it. Every stable export is listed here once.
_EXPORTS: dict[str, str] = {
    "DPOConfig": "honelm.methods.dpo",
    "DPOTrainer": "honelm.methods.dpo",
    "ExperimentalWarning": "honelm.stability",
    "GRPOConfig": "honelm.methods.grpo",
    "GRPOTrainer": "honelm.methods.grpo",
    "KTOConfig": "honelm.methods.kto",
    "KTOTrainer": "honelm.methods.kto",
    "RLOOConfig": "honelm.methods.rloo",
    "RLOOTrainer": "honelm.methods.rloo",
    "RewardConfig": "honelm.methods.reward",
    "RewardModelScorer": "honelm.methods.reward",
    "RewardTrainer": "honelm.methods.reward",
    "SFTConfig": "honelm.methods.sft",
    "SFTTrainer": "honelm.methods.sft",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'honelm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from .methods.dpo import DPOConfig, DPOTrainer
    from .methods.grpo import GRPOConfig, GRPOTrainer
    from .methods.kto import KTOConfig, KTOTrainer
    from .methods.rloo import RLOOConfig, RLOOTrainer
    from .methods.reward import RewardConfig, RewardModelScorer, RewardTrainer
    from .methods.sft import SFTConfig, SFTTrainer
    from .stability import ExperimentalWarning
