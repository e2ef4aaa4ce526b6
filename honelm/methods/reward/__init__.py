"""Reward modeling: :class:`RewardConfig`, :class:`RewardTrainer`, and :class:`RewardModelScorer`
to use a trained reward model as a reward function."""

from .config import RewardConfig
from .scoring import RewardModelScorer
from .trainer import DataCollatorForPreference, RewardTrainer

__all__ = ["DataCollatorForPreference", "RewardConfig", "RewardModelScorer", "RewardTrainer"]
