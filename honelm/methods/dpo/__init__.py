"""Direct Preference Optimization: :class:`DPOConfig`, :class:`DPOTrainer` and the loss variants (``loss.py``)."""

from .config import DPOConfig
from .trainer import DataCollatorForPreference, DPOTrainer

__all__ = ["DPOConfig", "DPOTrainer", "DataCollatorForPreference"]
