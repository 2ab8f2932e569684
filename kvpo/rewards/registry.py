"""The reward interface: how KVPO scores decoded videos, and a registry of reward models.

A reward model is a callable

    reward(videos, prompts, metadata=None) -> dict[str, Tensor]

- ``videos``: [B, T, 3, H, W] float in [0, 1], on any device.
- ``prompts``: a sequence of B strings, one per video (a multi-segment story where the model
  understands one; the toy reward parses ``", then "`` clauses).
- ``metadata``: optional mapping of extra per-video information, e.g. ``segment_starts``
  (a list of B lists of frame indices where each prompt segment starts).
- Returns one [B] float32 tensor per reward component, on the videos' device, each in [0, 1]
  for the built-in toy reward (real reward models may use other ranges; the advantage is
  normalised per group, so only the order within a group matters).

Real reward models plug in with :func:`register_reward` (then by name) or as an import path
``"pkg.module:Factory"``; :func:`resolve_reward` turns a name, a path or a callable into a reward
model, and :func:`score` validates inputs and outputs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch


class RewardModel(Protocol):
    """What every reward model implements (see the module docstring for the contract)."""

    names: tuple[str, ...]

    def __call__(
        self,
        videos: torch.Tensor,
        prompts: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]: ...


_FACTORIES: dict[str, Callable[..., RewardModel]] = {}
_BUILTIN = {
    "toy": "kvpo.toy.rewards:ToyReward",
    "motion_smoothness": "kvpo.rewards.motion:MotionSmoothnessReward",
    "dynamic_degree": "kvpo.rewards.motion:DynamicDegreeReward",
    "videoalign": "kvpo.rewards.videoalign:VideoAlignReward",
    "videoalign_vq": "kvpo.rewards.videoalign:VideoAlignVQ",
    "videoalign_mq": "kvpo.rewards.videoalign:VideoAlignMQ",
    "videoalign_mq_rgb": "kvpo.rewards.videoalign:VideoAlignMQRGB",
    "videoalign_ta": "kvpo.rewards.videoalign:VideoAlignTA",
    "video_hpsv3": "kvpo.rewards.hpsv3:HPSv3Reward",
}


def register_reward(
    name: str,
) -> Callable[[Callable[..., RewardModel]], Callable[..., RewardModel]]:
    """Class or factory decorator: make ``build_reward(name, **kwargs)`` construct it."""

    def add(factory: Callable[..., RewardModel]) -> Callable[..., RewardModel]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"a reward named {name!r} is already registered: {_FACTORIES[name]}")
        _FACTORIES[name] = factory
        return factory

    return add


def available_rewards() -> list[str]:
    """Names :func:`build_reward` accepts."""
    return sorted(set(_FACTORIES) | set(_BUILTIN))


def build_reward(name: str, **kwargs: Any) -> RewardModel:
    """Construct the reward model registered as ``name`` (built-ins are imported on demand)."""
    if name not in _FACTORIES and name not in _BUILTIN:
        raise KeyError(f"no reward named {name!r}; available: {available_rewards()}")
    return _factory(name)(**kwargs)


def resolve_reward(spec: str | Callable[..., Mapping[str, torch.Tensor]], **options: Any):
    """A reward model from a callable (returned as it is), an import path
    ``"pkg.module:Factory"`` or a registered name, the factory called with ``options`` (those
    whose value is None are left out: the factory's defaults apply), or the URL of a reward
    server ``"http://127.0.0.1:PORT/NAME"`` (:class:`~kvpo.rewards.client.RemoteReward`; only
    ``batch_size`` applies, the scorer's other options are the server's).

    ``options`` are the scorer settings a run passes along (``path``, ``batch_size``,
    ``offload``, ...); a factory that does not take one that is set raises TypeError naming it.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"reward must be a callable, a registered name or 'pkg.module:Factory', "
                        f"got {spec!r}")  # fmt: skip
    if spec.startswith(("http://", "https://")):
        from kvpo.rewards.client import RemoteReward

        server_side = sorted(set(options) - {"batch_size"})
        if server_side:
            raise TypeError(
                f"reward {spec!r} is served: set {server_side} on the server "
                "(kvpo reward-server --path ... --base-model ... --offload)"
            )
        return RemoteReward(spec, **options)
    if ":" not in spec:
        if spec not in _FACTORIES and spec not in _BUILTIN:
            raise KeyError(f"no reward named {spec!r}; available: {available_rewards()}")
        _check_options(spec, _factory(spec), options)
        return build_reward(spec, **options)
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"reward_model {spec!r}: cannot import {attr!r} from {module!r} ({err})"
        ) from err
    _check_options(spec, factory, options)
    return factory(**options)


REWARD_OPTIONS = {  # config key -> scorer option
    "reward_path": "path",
    "reward_base_model": "base_model",
    "reward_batch_size": "batch_size",
    "reward_offload": "offload",
}


def reward_options(cfg: Any) -> dict[str, Any]:
    """The scorer options a run's config sets (``reward_path`` -> ``path``, ...): the keys of
    :data:`REWARD_OPTIONS` that ``cfg`` has with a value other than empty, 0 or False."""
    out = {}
    for key, option in REWARD_OPTIONS.items():
        value = getattr(cfg, key, None)
        if value not in (None, "", 0, False):
            out[option] = value
    return out


def _factory(name: str) -> Callable[..., RewardModel]:
    if name not in _FACTORIES and name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        _FACTORIES.setdefault(name, getattr(importlib.import_module(module), attr))
    return _FACTORIES[name]


def _check_options(spec: str, factory: Callable, options: Mapping[str, Any]) -> None:
    """TypeError naming the options ``factory`` does not accept (none when it takes **kwargs)."""
    if not options:
        return
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"reward {spec!r} does not take the option(s) {unknown} that the run sets; "
            f"it takes {sorted(accepted)}"
        )


def check_videos(videos: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise ValueError unless ``videos`` is [B, T, 3, H, W] floating in [0, 1] with B prompts."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [B, T, 3, H, W], got shape {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise ValueError(f"videos must be a floating tensor in [0, 1], got {videos.dtype}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"expected {videos.shape[0]} prompts (one per video), got {len(prompts)}")
    if videos.numel() and (videos.min() < 0 or videos.max() > 1):
        raise ValueError(
            f"videos must lie in [0, 1], got [{videos.min().item():.3f}, {videos.max().item():.3f}]"
        )


def score(
    reward: RewardModel,
    videos: torch.Tensor,
    prompts: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Call ``reward`` after checking its inputs, and check that it returned [B] fp32 tensors."""
    check_videos(videos, prompts)
    out = reward(videos, prompts, metadata)
    batch = videos.shape[0]
    if set(out) != set(reward.names):
        raise ValueError(f"reward promised components {reward.names}, returned {sorted(out)}")
    for key, value in out.items():
        if value.shape != (batch,) or value.dtype != torch.float32:
            raise ValueError(
                f"reward component {key!r} must be a [{batch}] float32 tensor, "
                f"got {tuple(value.shape)} {value.dtype}"
            )
        if value.device != videos.device:
            raise ValueError(
                f"reward component {key!r} is on {value.device}, videos on {videos.device}"
            )
    return out


def select_components(
    values: Mapping[str, torch.Tensor], names: Sequence[str], what: str = "components"
) -> dict[str, torch.Tensor]:
    """``{name: values[name]}`` for ``names``, in their order; ValueError naming the components
    asked for (``what``: the config key that asked) and those the reward returned."""
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(
            f"{what} name {missing}, which the reward model does not return; it returns "
            f"{sorted(values)}"
        )
    return {n: values[n] for n in names}


def weighted_sum(
    components: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> torch.Tensor:
    """``sum_k weights[k] * components[k]``: [B] fp32. Every weighted name must be present."""
    missing = sorted(set(weights) - set(components))
    if missing:
        raise KeyError(f"weights name components {missing} that the reward did not return")
    total = None
    for key, w in weights.items():
        term = w * components[key].float()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weights must name at least one component, got none")
    return total
