"""The parts of the trainer configuration: :class:`ConfigError`, the field helper with help text
and choices, and the nested sections (``model_kwargs``, ``adapter``, ``reward_components``)
:class:`~kvpo.training.config.TrainConfig` holds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work starts."""


def _f(default, help: str, group: str | None = None, choices: tuple | None = None):
    """A dataclass field with help text (``group`` starts a new section in ``--help``) and, where
    only some values are allowed, their ``choices``."""
    meta = {"help": help, "group": group, "choices": choices}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return dict(value) if isinstance(value, dict) else value


@dataclass
class ModelKwargs:
    """Cache geometry of the causal model (LongLive's ``model_kwargs``)."""

    local_attn_size: int = _f(9, "frames a block attends to, sink and current block included")
    sink_size: int = _f(3, "first frames kept in the cache forever (the attention sink)")
    timestep_shift: float = _f(1.0, "flow-matching time shift of the sampler's schedule")
    bank_size: int = _f(0, "MemFlow's memory bank: frames per layer (0 = no bank, LongLive)")
    record_interval: int = _f(3, "MemFlow: a block's first frame is recorded every this many")
    sma: bool = _f(
        False,
        "MemFlow's sparse memory activation: each head attends to the 3 sink and bank frames "
        "closest to the block's mean query (their SMA)",
    )


@dataclass
class AdapterConfig:
    """LoRA adapter (peft) trained by KVPO (LongLive's ``adapter``)."""

    type: str = _f("lora", "adapter type", choices=("lora",))
    rank: int = _f(16, "LoRA rank (method default 256 for Wan-1.3B)")
    alpha: float = _f(16.0, "LoRA alpha (scale alpha / rank)")
    dropout: float = _f(0.0, "LoRA dropout")
    target_modules: list[str] = _f(
        [], "module names LoRA wraps; empty = the model's attention and FFN linears"
    )


@dataclass
class RewardComponent:
    """One weighted reward component (a key of the reward model's output dict)."""

    name: str = _f("", "component name as returned by the reward model")
    weight: float = _f(1.0, "weight in the advantage sum")


TOY_REWARDS = [
    RewardComponent("text_alignment", 1.0),
    RewardComponent("motion_quality", 1.0),
    RewardComponent("visual_quality", 1.0),
]
