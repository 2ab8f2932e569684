"""Motion rewards from optical flow: ``motion_smoothness`` and ``dynamic_degree``.

Both follow the KVPO authors' scorers (``rewards/scorers/video/flowscorer.py`` and
``dynamic_degree.py`` of their release), with the flow of :mod:`kvpo.rewards.raft` (torchvision's
RAFT architecture and weights, ``num_flow_updates`` refinements) between consecutive frames
``t -> t + 1`` of each clip: ``flows [B, P, 2, H, W]`` in pixels, ``P = T - 1``. A clip of one
frame scores 0 in every component (the authors' rule).

**Motion smoothness** rewards coherent flow fields, not motion magnitude (``eps = 1e-6``,
``|v| = sqrt(v_x^2 + v_y^2 + eps)``, moving pixels ``M = |flow| > 0.02``)::

    spatial  = (mean_{M & M right} |f(x + 1) - f(x)| + mean_{M & M below} |f(y + 1) - f(y)|) / 2
    temporal = mean_{M_p & M_{p+1}} |f_{p+1} - f_p|                 (0 when P < 2)
    motion_smoothness = exp(-8 (0.6 spatial + 0.4 temporal))

(a mean over an empty set is 0). Diagnostics: ``motion_spatial_jitter``,
``motion_temporal_jitter``, ``motion_ratio`` (fraction of moving pixels).

**Dynamic degree** rewards moderate, steady motion. ``m = min(1, |flow| / (0.15 sqrt(H^2 + W^2)))``
per pixel (``|flow|`` without eps), ``top_p`` = mean of the largest ``max(1, int(H W 5 / 100))``
values of pair ``p``, ``v = mean_p top_p``, ``a_p = mean over pixels of m``::

    magnitude = exp(-(v - 0.6)^2 / (2 * 0.2^2)) * (1 - clip((v - 1.2) / 1.2, 0, 1))
                * (1 - 0.5 exp(-3 v))
    steadiness = exp(-mean_p |a_{p+1} - a_p| / 0.1)                   (1 when P < 2)
    dynamic_degree = 1.5 magnitude + 1.0 steadiness

Diagnostics: ``dynamic_magnitude``, ``dynamic_steadiness``, ``dynamic_normalized_magnitude``
(``v``). The authors feed their flow model [0, 1] frames where it expects 0..255; here frames are
scaled as RAFT's weights expect ([-1, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvpo.rewards.placement import Placement, batches
from kvpo.rewards.raft import MIN_SIZE, RAFT, load_raft
from kvpo.rewards.registry import register_reward

EPS = 1e-6


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-video mean of ``values`` where ``mask``: ``[B, ...] -> [B]`` (0 where none is set)."""
    weight = mask.to(values.dtype).flatten(1)
    return (values.flatten(1) * weight).sum(1) / weight.sum(1).clamp_min(EPS)


def smoothness_terms(
    flows: torch.Tensor,
    motion_threshold: float = 0.02,
    spatial_weight: float = 0.6,
    temporal_weight: float = 0.4,
    scale: float = 8.0,
) -> dict[str, torch.Tensor]:
    """Motion smoothness of ``flows [B, P, 2, H, W]`` (module docstring): ``{name: [B] fp32}``."""
    flows = flows.float()
    batch, pairs = flows.shape[:2]
    if pairs == 0:
        return dict.fromkeys(MotionSmoothnessReward.names, flows.new_zeros(batch))

    def norm(v):
        return torch.sqrt((v**2).sum(dim=2) + EPS)

    moving = norm(flows) > motion_threshold  # [B, P, H, W]
    dx = norm(flows[..., :, 1:] - flows[..., :, :-1])
    dy = norm(flows[..., 1:, :] - flows[..., :-1, :])
    spatial = 0.5 * (
        _masked_mean(dx, moving[..., :, 1:] & moving[..., :, :-1])
        + _masked_mean(dy, moving[..., 1:, :] & moving[..., :-1, :])
    )
    if pairs < 2:
        temporal = flows.new_zeros(batch)
    else:
        temporal = _masked_mean(norm(flows[:, 1:] - flows[:, :-1]), moving[:, 1:] & moving[:, :-1])
    jitter = spatial_weight * spatial + temporal_weight * temporal
    return {
        "motion_smoothness": torch.exp(-scale * jitter),
        "motion_spatial_jitter": spatial,
        "motion_temporal_jitter": temporal,
        "motion_ratio": moving.float().flatten(1).mean(1),
    }


def dynamic_degree_terms(
    flows: torch.Tensor,
    sigma: float = 0.15,
    target: float = 0.6,
    tolerance: float = 0.2,
    maximum: float = 1.2,
    steadiness_sigma: float = 0.1,
    magnitude_weight: float = 1.5,
    steadiness_weight: float = 1.0,
    percentile: float = 95.0,
) -> dict[str, torch.Tensor]:
    """Dynamic degree of ``flows [B, P, 2, H, W]`` (module docstring): ``{name: [B] fp32}``."""
    flows = flows.float()
    batch, pairs, _, height, width = flows.shape
    if pairs == 0:
        return dict.fromkeys(DynamicDegreeReward.names, flows.new_zeros(batch))
    magnitude = torch.sqrt(flows[:, :, 0] ** 2 + flows[:, :, 1] ** 2)
    m = (magnitude / (sigma * math.sqrt(height**2 + width**2))).clamp(0, 1)  # [B, P, H, W]
    k = max(1, int(height * width * (100 - percentile) / 100))
    v = m.flatten(2).topk(k, dim=-1).values.mean(-1).mean(-1)  # [B]
    reward = torch.exp(-((v - target) ** 2) / (2 * tolerance**2))
    if maximum > 0:
        reward = reward * (1 - ((v - maximum) / maximum).clamp(0, 1))
    reward = reward * (1 - 0.5 * torch.exp(-3.0 * v))
    if pairs < 2:
        steadiness = torch.ones_like(v)
    else:
        level = m.mean(dim=(2, 3))  # [B, P]
        steadiness = torch.exp(-(level[:, 1:] - level[:, :-1]).abs().mean(-1) / steadiness_sigma)
    return {
        "dynamic_degree": magnitude_weight * reward + steadiness_weight * steadiness,
        "dynamic_magnitude": reward,
        "dynamic_steadiness": steadiness,
        "dynamic_normalized_magnitude": v,
    }


class FlowField:
    """RAFT flow between consecutive frames of decoded videos.

    ``__call__(videos [B, T, 3, H, W] in [0, 1]) -> [B, T - 1, 2, H, W]`` fp32 pixels, pair
    ``p`` from frame ``p`` to ``p + 1``. Frames are scaled to ``[-1, 1]``, padded (edge pixels
    repeated, centred) to multiples of 8 of at least 128 per side, run through ``model`` in
    batches of ``batch_size`` pairs (0: all), and the flow is cropped back to ``H x W``.
    """

    def __init__(self, model: RAFT, batch_size: int = 16):
        self.model, self.batch_size = model, batch_size

    @staticmethod
    def padding(height: int, width: int) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding of an ``H x W`` frame."""
        pad_h = max(MIN_SIZE, -(-height // 8) * 8) - height
        pad_w = max(MIN_SIZE, -(-width // 8) * 8) - width
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        batch, frames, _, height, width = videos.shape
        if frames < 2:
            return videos.new_zeros(batch, 0, 2, height, width, dtype=torch.float32)
        dtype = next(self.model.parameters()).dtype
        first = videos[:, :-1].reshape(-1, 3, height, width)
        second = videos[:, 1:].reshape(-1, 3, height, width)
        left, right, top, bottom = self.padding(height, width)
        out = []
        for rows in batches(first.shape[0], self.batch_size):
            pair = torch.cat([first[rows], second[rows]]).to(dtype) * 2 - 1
            pair = F.pad(pair, (left, right, top, bottom), mode="replicate")
            image1, image2 = pair.chunk(2)
            flow = self.model(image1, image2).float()
            out.append(flow[..., top : top + height, left : left + width])
        return torch.cat(out).reshape(batch, frames - 1, 2, height, width)


class _FlowReward:
    """A RAFT-based reward: weights from ``path`` (see :func:`~kvpo.rewards.raft.load_raft`),
    flow in batches of ``batch_size`` frame pairs, ``offload`` as in
    :class:`~kvpo.rewards.placement.Placement`. Prompt-free: prompts and metadata are ignored."""

    names: tuple[str, ...] = ()

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        arch: str | None = None,
        num_flow_updates: int = 12,
        batch_size: int = 16,
        offload: bool = False,
        model: RAFT | None = None,
    ):
        if model is None:
            if path is None:
                raise ValueError(
                    f"{self.names[0]} needs path= the RAFT weights file (torchvision's "
                    "raft_large_C_T_SKHT_V2-ff5fadd5.pth); see docs/rewards.md"
                )
            model = load_raft(path, arch, num_flow_updates)
        self.flow = FlowField(model, batch_size)
        self.placement = Placement(model, offload)

    def terms(self, flows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(
        self,
        videos: torch.Tensor,
        prompts: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        with self.placement.on(videos.device):
            flows = self.flow(videos)
        return {k: v.float() for k, v in self.terms(flows).items()}


@register_reward("motion_smoothness")
class MotionSmoothnessReward(_FlowReward):
    """``motion_smoothness`` in (0, 1] and its diagnostics (:func:`smoothness_terms`)."""

    names = ("motion_smoothness", "motion_spatial_jitter", "motion_temporal_jitter", "motion_ratio")

    def terms(self, flows):
        return smoothness_terms(flows)


@register_reward("dynamic_degree")
class DynamicDegreeReward(_FlowReward):
    """``dynamic_degree`` in [0, 2.5] and its diagnostics (:func:`dynamic_degree_terms`)."""

    names = (
        "dynamic_degree",
        "dynamic_magnitude",
        "dynamic_steadiness",
        "dynamic_normalized_magnitude",
    )

    def terms(self, flows):
        return dynamic_degree_terms(flows)
