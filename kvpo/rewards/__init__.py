"""Rewards: the reward-model contract and registry (:mod:`.registry`), the clips of a video that
are scored, local and global (:mod:`.clips`), the real scorers (:mod:`.hpsv3`, :mod:`.videoalign`,
:mod:`.motion` on :mod:`.raft`; imported when built by name) and the reward server
(:mod:`.server`, :mod:`.client`)."""

from kvpo.rewards.registry import (
    RewardModel,
    available_rewards,
    build_reward,
    register_reward,
    resolve_reward,
    reward_options,
    score,
    weighted_sum,
)

__all__ = [
    "RewardModel",
    "available_rewards",
    "build_reward",
    "register_reward",
    "resolve_reward",
    "reward_options",
    "score",
    "weighted_sum",
]
