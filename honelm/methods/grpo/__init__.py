"""Group Relative Policy Optimization: :class:`GRPOConfig`, :class:`GRPOTrainer` and the loss family (``loss.py``)."""

from .config import GRPOConfig
from .trainer import GRPOTrainer, RepeatSampler

__all__ = ["GRPOConfig", "GRPOTrainer", "RepeatSampler"]
