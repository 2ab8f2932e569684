"""kvpo: KVPO training of streaming autoregressive video generators.

    from kvpo import KVPOTrainer, TrainConfig

    KVPOTrainer(TrainConfig(max_train_steps=20), reward=my_reward).train()

Layout by stage: :mod:`kvpo.method` (routing, rollout, replay, advantages, policy: the
algorithm), :mod:`kvpo.rewards` (the reward contract, registry and scored clips),
:mod:`kvpo.streaming` (the one generation path), :mod:`kvpo.training` (config, the learner, the
trainer loop, evaluation, checkpoints, distributed), :mod:`kvpo.outputs` (plots, videos, logs,
progress), :mod:`kvpo.models` (the causal Wan model over the paged cache), :mod:`kvpo.toy` (the
built-in world, rewards and model). The kernels live in the standalone ``kvpo_kernels``.
"""

from kvpo.training.config import ConfigError, TrainConfig
from kvpo.training.config_parse import load_config

__all__ = ["ConfigError", "KVPOTrainer", "TrainConfig", "load_config"]


def __getattr__(name: str):
    if name == "KVPOTrainer":  # imports the models (diffusers): only when asked for
        from kvpo.training.trainer import KVPOTrainer

        return KVPOTrainer
    raise AttributeError(f"module 'kvpo' has no attribute {name!r}")
