"""REINFORCE Leave-One-Out: :class:`RLOOConfig` and :class:`RLOOTrainer`."""

from .config import RLOOConfig
from .trainer import RLOOTrainer, RoundSampler

__all__ = ["RLOOConfig", "RLOOTrainer", "RoundSampler"]
