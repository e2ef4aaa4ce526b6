"""Kahneman-Tversky Optimization: :class:`KTOConfig` and :class:`KTOTrainer`."""

from .config import KTOConfig
from .trainer import DataCollatorForUnpairedPreference, KTOTrainer

__all__ = ["DataCollatorForUnpairedPreference", "KTOConfig", "KTOTrainer"]
