"""Group advantages from per-branch rewards (docs/method.md section 4).

Per reward component ``k`` (rewards ``r: [G]`` of the branches, ``a`` of the unrouted anchor):

    anchor mode (KVPO):  A_k = (r - a) / (std([r_1..r_G, a]) + 1e-8)     (unbiased std, G+1 values)
    grpo mode:           A_k = (r - mean(r)) / (std(r) + 1e-8)           (anchor unused)

The component advantages are weighted and summed into one advantage per signal (``local``:
the forked chunk, ``global``: the per-segment clips of the whole video); with ``raw_weighted``
(the authors' ``use_raw_weighted_reward_advantage``) the signal's advantage is instead the
formula above applied once to the weighted raw rewards ``sum_k w_k r_k`` (anchor:
``sum_k w_k a_k``); the per-component advantages are still reported. Fusion divides each
signal's advantage by its population std over the group (no centring, so anchor-relative signs
survive; left as is when that std is <= 1e-8) and combines ``w_local * local + w_global *
global`` (1 and 0.5 by default), then clips to ``[-adv_clip_max, adv_clip_max]`` (2.5).

All tensors are fp32 on the rewards' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8
ADVANTAGE_MODES = ("anchor", "grpo")
FUSION_MODES = ("std", "none", "zscore")


def anchor_advantage(rewards: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``(r - a) / (std(r ++ a) + 1e-8)``; rewards ``[G]``, anchor scalar -> ``[G]`` fp32."""
    r, a = rewards.float(), anchor.float().reshape(())
    return (r - a) / (torch.cat([r, a.reshape(1)]).std() + EPS)


def group_mean_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """Plain GRPO: ``(r - mean(r)) / (std(r) + 1e-8)``; ``[G]`` -> ``[G]`` fp32."""
    r = rewards.float()
    std = r.std() if r.numel() > 1 else r.new_zeros(())
    return (r - r.mean()) / (std + EPS)


def signal_advantage(
    rewards: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    weights: dict[str, float],
    mode: str = "anchor",
    raw_weighted: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum over components of their advantages: ``(total [G], {name: [G]})``; with
    ``raw_weighted``, ``total`` is the advantage of the weighted raw rewards.

    ``rewards[name]: [G]``, ``anchor[name]``: scalar (unused in ``grpo`` mode), ``weights[name]``.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise KeyError(f"rewards lack components {missing}; got {sorted(rewards)}")

    def advantage(r: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        return anchor_advantage(r, a) if mode == "anchor" else group_mean_advantage(r)

    per_component = {}
    total = None
    for name, weight in weights.items():
        adv = advantage(rewards[name], anchor[name] if mode == "anchor" else None)
        per_component[name] = adv
        total = adv * weight if total is None else total + adv * weight
    if raw_weighted:
        raw_anchor = weighted_total(anchor, weights) if mode == "anchor" else None
        total = advantage(weighted_total(rewards, weights), raw_anchor)
    return total, per_component


def normalize_for_fusion(adv: torch.Tensor, mode: str = "std") -> torch.Tensor:
    """Scale one signal's advantage by its population std (``std``), also centre (``zscore``),
    or leave it (``none``); unchanged when the std is <= 1e-8 (``zscore``: only centred)."""
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
    if mode == "none":
        return adv
    std = adv.std(unbiased=False)
    if mode == "zscore":
        centred = adv - adv.mean()
        return centred if std <= EPS else centred / (std + EPS)
    return adv if std <= EPS else adv / (std + EPS)


@dataclass
class GroupAdvantages:
    """Everything the update and the logs need: ``final`` is what the objective uses."""

    final: torch.Tensor  # [G], fused and clipped
    fused: torch.Tensor  # [G], before clipping
    local: torch.Tensor | None  # [G], weighted component sum before fusion scaling
    global_: torch.Tensor | None
    components: dict[str, torch.Tensor]  # "local/<name>", "global/<name>": [G]

    @property
    def clip_fraction(self) -> float:
        return float((self.final != self.fused).float().mean())


@dataclass(frozen=True)
class AdvantageConfig:
    """How per-signal advantages are formed and fused (defaults: the method's).

    ``mode``: ``"anchor"`` (reward minus the anchor's) or ``"grpo"`` (minus the group mean);
    ``fusion_mode``: scaling of each signal before fusion (:func:`normalize_for_fusion`);
    ``clip``: bound of the fused advantage (``<= 0``: no clip); ``raw_weighted``: each signal's
    advantage from its weighted raw rewards (:func:`signal_advantage`).
    """

    mode: str = "anchor"
    fusion_mode: str = "std"
    local_weight: float = 1.0
    global_weight: float = 0.5
    clip: float = 2.5
    raw_weighted: bool = False


def group_advantages(
    local: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
    global_: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
    weights: dict[str, float],
    config: AdvantageConfig | None = None,
) -> GroupAdvantages:
    """Advantages of one group from ``(branch rewards, anchor rewards)`` per signal.

    Either signal may be None (training on one only).
    """
    config = config or AdvantageConfig()
    mode, fusion_mode, clip = config.mode, config.fusion_mode, config.clip
    local_weight, global_weight = config.local_weight, config.global_weight
    if local is None and global_ is None:
        raise ValueError("need the local or the global rewards (or both), got neither")
    signals, components, fused = {}, {}, None
    for name, signal, weight in (
        ("local", local, local_weight),
        ("global", global_, global_weight),
    ):
        if signal is None:
            signals[name] = None
            continue
        total, per_component = signal_advantage(
            signal[0], signal[1], weights, mode, config.raw_weighted
        )
        signals[name] = total
        components.update({f"{name}/{k}": v for k, v in per_component.items()})
        term = normalize_for_fusion(total, fusion_mode) * weight
        fused = term if fused is None else fused + term
    final = fused.clamp(-clip, clip) if clip > 0 else fused
    return GroupAdvantages(final, fused, signals["local"], signals["global"], components)


def weighted_total(rewards: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum_k w_k r_k`` over the weighted components (any shape, fp32)."""
    return sum(rewards[k].float() * w for k, w in weights.items())


def any_branch_beats_anchor(
    signals: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None],
    weights: dict[str, float],
) -> bool:
    """True when some branch's weighted raw reward exceeds the anchor's on some signal (the
    reward gate of the objective's scale ``s``)."""
    for signal in signals:
        if signal is None:
            continue
        if bool((weighted_total(signal[0], weights) > weighted_total(signal[1], weights)).any()):
            return True
    return False
