"""Reading rewards out of a sequence-classification model: see :mod:`honelm.models.reward_scoring`
(shared with :class:`honelm.rewards.RewardModel`, so that training and scoring read the same token)."""

from __future__ import annotations

from honelm.models.reward_scoring import (
    RewardModelScorer,
    find_score_head,
    last_token_indices,
    lengths_from_position_ids,
    sequence_rewards,
)

__all__ = [
    "RewardModelScorer",
    "find_score_head",
    "last_token_indices",
    "lengths_from_position_ids",
    "sequence_rewards",
]
