"""Supervised fine-tuning: :class:`SFTConfig` and :class:`SFTTrainer`."""

from .config import SFTConfig
from .trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
