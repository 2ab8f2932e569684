"""Rewards: the reward-model contract and registry (:mod:`.registry`) and the clips of a video
that are scored, local and global (:mod:`.clips`)."""

from kvpo.rewards.registry import (
    RewardModel,
    available_rewards,
    build_reward,
    register_reward,
    resolve_reward,
    score,
    weighted_sum,
)

__all__ = [
    "RewardModel",
    "available_rewards",
    "build_reward",
    "register_reward",
    "resolve_reward",
    "score",
    "weighted_sum",
]
