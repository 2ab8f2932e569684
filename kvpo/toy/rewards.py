"""Verifiable pixel rewards of the toy world: text alignment, motion quality, visual quality.

The toy counterparts of VideoAlign's TA, MQ and VQ. Deterministic, each in [0, 1], computed by
:mod:`kvpo.toy.objects` measurements (tracked object = largest foreground component). Notation:
``clip(x) = min(max(x, 0), 1)``, ``ramp(x, a, b) = clip(1 - max(x - a, 0) / b)`` (1 up to
``a``, falling to 0 at ``a + b``). A frame *has the object* when its largest component has
6 to 256 pixels (world objects have about 40 to 80); *single* when it has it and no split.

**Text alignment** (per segment ``k``, frames ``F_k``; the video's TA is the mean over segments)::

    colour_k    = mean_{t in F_k} [has_t] * ramp(huedist(hue_t, hue_k), 10, 40) * clip(sat_t / 0.5)
    shape_k     = mean_{t in F_k} [has_t] * min(ramp(|fill_t - fill_k|, a_k, 0.1 or 0.05),
                                                ramp(|skew_t - skew_k|, b_k, 0.04))
    direction_k = clip((v . d_k - |v x d_k|) / 0.5) * (present fraction of F_k)
    TA_k        = (colour_k + shape_k + direction_k) / 3

``hue_k`` is the palette hue of the prompt colour (0, 60, ..., 300 degrees); ``(fill_k, a_k)``
and ``(skew_k, b_k)`` are the shape's bounding-box fill ratio and vertical skew with their
tolerances (:data:`SHAPE_TARGETS`: circle fill 0.76 +- 0.16, square 1.0 +- 0.04, triangle
0.585 +- 0.085; skew 0 +- 0.06 for circle and square, 0.14 +- 0.035 for the triangle: pixelised
shapes of radius 3.5 to 5 at any sub-pixel position fall inside); ``d_k`` the prompt direction and
``v`` the least-squares slope (px/frame) of the centroid over the segment's frames that have the
object (needs two of them, else ``direction_k = 0``).

**Motion quality**, over steps ``t -> t+1`` and triples ``t-1, t, t+1`` (missing object: 0)::

    presence = mean_t [single_t]
    smooth   = mean_t ramp(|c_{t+1} - 2 c_t + c_{t-1}|, 0.75, 1.0)   (triples within a segment)
    size     = mean_t ramp(|a_{t+1} - a_t| / max(a_t, a_{t+1}), 0.15, 0.3)
    form     = mean_t ramp(|fill_{t+1} - fill_t|, 0.15, 0.2)
    steady   = mean_t ramp(|rgb_{t+1} - rgb_t|, 0.1, 0.3)            (steps inside a segment)
    MQ       = presence * (smooth + (size + form + steady) / 3) / 2

**Visual quality**, per frame, averaged over frames::

    background = [has] * clip(1 - mean(value of the pixels outside the object) / 0.08)
    palette    = [has] * ramp(mean over object pixels of the RGB distance to the nearest
                              palette colour, 0.05, 0.3)
    sharpness  = [has] * clip(1 - (#rim pixels with 0.15 < value < 0.85) / (0.5 * area))
    VQ         = (background + palette + sharpness) / 3

where the rim is the object dilated by 1 px. Every term is gated by ``[has]``: an empty frame
scores 0 (an all-black video would otherwise earn a clean background for drawing nothing).

Segment boundaries come from ``metadata["segment_starts"]`` (B lists of frame indices) when
given, else the prompt's segments split the T frames evenly in whole blocks of 3
(:func:`kvpo.toy.world.segment_starts`; single frames when T is not a multiple of 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kvpo.rewards.registry import register_reward
from kvpo.toy.objects import FrameObjects, measure
from kvpo.toy.prompts import COLOURS, DIRECTIONS, SHAPES, parse_prompt
from kvpo.toy.world import segment_starts

MIN_AREA, MAX_AREA = 6, 256
SHAPE_TARGETS = {  # shape: (fill, free, width), (skew, free, width)
    "circle": ((0.76, 0.16, 0.05), (0.0, 0.06, 0.04)),
    "square": ((1.0, 0.04, 0.1), (0.0, 0.06, 0.04)),
    "triangle": ((0.585, 0.085, 0.1), (0.14, 0.035, 0.04)),
}
COLOUR_HUE = {name: 60.0 * i for i, name in enumerate(COLOURS)}
assert tuple(SHAPE_TARGETS) == SHAPES


def _clip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def _ramp(x: torch.Tensor, free: float, width: float) -> torch.Tensor:
    return _clip(1 - (x - free).clamp_min(0) / width)


def _has_object(obj: FrameObjects) -> torch.Tensor:
    return (obj.area >= MIN_AREA) & (obj.area <= MAX_AREA)


def _mean(values: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over eligible entries of the last dim; 1 where nothing is eligible."""
    count = eligible.sum(-1)
    total = (values * eligible).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total))


def segment_starts_for(prompts, metadata, num_frames: int) -> list[list[int]]:
    """Segment start frames per video, from metadata or the block-aligned even split."""
    if metadata is not None and "segment_starts" in metadata:
        starts = [list(map(int, s)) for s in metadata["segment_starts"]]
    else:
        block = 3 if num_frames % 3 == 0 else 1
        starts = [segment_starts(len(parse_prompt(p)), num_frames // block, block) for p in prompts]
    for b, s in enumerate(starts):
        if not s or s[0] != 0 or any(a >= c for a, c in zip(s, s[1:])) or s[-1] >= num_frames:
            raise ValueError(
                f"video {b}: segment starts must increase from 0 and stay below T={num_frames}, "
                f"got {s}"
            )
    return starts


def _segment_of_frame(starts: list[list[int]], num_frames: int, device) -> torch.Tensor:
    """[B, T] int64 index of the segment each frame belongs to."""
    t = torch.arange(num_frames, device=device)
    rows = [
        (t.unsqueeze(1) >= torch.tensor(s, device=device).unsqueeze(0)).sum(1) - 1 for s in starts
    ]
    return torch.stack(rows)


def text_alignment(obj: FrameObjects, prompts, starts, batch: int, frames: int) -> torch.Tensor:
    """TA per segment (see module docstring): returns [B, K_max] with NaN for absent segments."""
    device = obj.area.device
    has = _has_object(obj).view(batch, frames).float()
    hue, sat = obj.hue.view(batch, frames), obj.saturation.view(batch, frames)
    fill, skew = obj.fill.view(batch, frames), obj.skew.view(batch, frames)
    centre = obj.centre.view(batch, frames, 2)
    t = torch.arange(frames, device=device, dtype=torch.float32)
    k_max = max(len(s) for s in starts)
    out = torch.full((batch, k_max), float("nan"), device=device)
    for b, prompt in enumerate(prompts):
        segments = parse_prompt(prompt)
        if len(segments) != len(starts[b]):
            raise ValueError(
                f"video {b}: prompt has {len(segments)} segments, segment_starts {starts[b]}"
            )
        bounds = [*starts[b], frames]
        for k, seg in enumerate(segments):
            sl = slice(bounds[k], bounds[k + 1])
            h = has[b, sl]
            gap = (hue[b, sl] - COLOUR_HUE[seg.colour]).abs() % 360
            gap = torch.minimum(gap, 360 - gap)
            colour = (h * _ramp(gap, 10.0, 40.0) * _clip(sat[b, sl] / 0.5)).mean()
            (f0, f_free, f_width), (k0, k_free, k_width) = SHAPE_TARGETS[seg.shape]
            shape = h * torch.minimum(
                _ramp((fill[b, sl] - f0).abs(), f_free, f_width),
                _ramp((skew[b, sl] - k0).abs(), k_free, k_width),
            )
            shape = shape.mean()
            direction = torch.zeros((), device=device)
            if h.sum() >= 2:
                w = h / h.sum()
                tt = t[sl] - (w * t[sl]).sum()
                slope = (w.unsqueeze(1) * tt.unsqueeze(1) * centre[b, sl]).sum(0) / (
                    (w * tt * tt).sum().clamp_min(1e-6)
                )
                d = torch.tensor(DIRECTIONS[seg.direction], device=device)
                along = (slope * d).sum()
                across = (slope[0] * d[1] - slope[1] * d[0]).abs()
                direction = _clip((along - across) / 0.5) * h.mean()
            out[b, k] = (colour + shape + direction) / 3
    return out


def motion_quality(obj: FrameObjects, seg_of_frame: torch.Tensor) -> torch.Tensor:
    """MQ per video (see module docstring): [B]."""
    batch, frames = seg_of_frame.shape
    single = (_has_object(obj) & ~obj.split).view(batch, frames).float()
    c = obj.centre.view(batch, frames, 2)
    a, fill = obj.area.view(batch, frames), obj.fill.view(batch, frames)
    rgb = obj.rgb.view(batch, frames, 3)
    both = single[:, 1:] * single[:, :-1]
    size = _ramp(
        (a[:, 1:] - a[:, :-1]).abs() / torch.maximum(a[:, 1:], a[:, :-1]).clamp_min(1), 0.15, 0.3
    )
    form = _ramp((fill[:, 1:] - fill[:, :-1]).abs(), 0.15, 0.2)
    same_seg = (seg_of_frame[:, 1:] == seg_of_frame[:, :-1]).float()
    steady = _ramp((rgb[:, 1:] - rgb[:, :-1]).norm(dim=-1), 0.1, 0.3)
    steps = torch.ones_like(both)
    accel = (c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1)
    triple = single[:, 2:] * single[:, 1:-1] * single[:, :-2]
    smooth_ok = same_seg[:, 1:] * same_seg[:, :-1]
    smooth = _mean(triple * _ramp(accel, 0.75, 1.0), smooth_ok)
    shape = _mean(both * size, steps) + _mean(both * form, steps) + _mean(both * steady, same_seg)
    return single.mean(1) * (smooth + shape / 3) / 2


def visual_quality(frames: torch.Tensor, obj: FrameObjects) -> torch.Tensor:
    """VQ per frame (see module docstring). frames: [N, 3, H, W] -> [N]."""
    has = _has_object(obj).float()
    near = F.max_pool2d(obj.mask.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0
    outside = (~obj.mask).float()
    dirt = (obj.value * outside).sum((1, 2)) / outside.sum((1, 2)).clamp_min(1)
    background = has * _clip(1 - dirt / 0.08)
    palette = torch.tensor(list(COLOURS.values()), device=frames.device)
    pixels = frames.float().permute(0, 2, 3, 1).unsqueeze(-2)
    nearest = (pixels - palette).norm(dim=-1).amin(-1)
    weight = obj.mask.float()
    off_palette = (nearest * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1)
    palette_score = has * _ramp(off_palette, 0.05, 0.3)
    rim = near & ~obj.mask & (obj.value > 0.15) & (obj.value < 0.85)
    blur = rim.float().sum((1, 2)) / (0.5 * obj.area).clamp_min(1)
    sharpness = has * _clip(1 - blur)
    return (background + palette_score + sharpness) / 3


@register_reward("toy")
class ToyReward:
    """The toy world's pixel rewards; see the module docstring for the formulas.

    ``reward(videos [B, T, 3, H, W] in [0, 1], prompts (B stories), metadata)`` returns
    ``{"text_alignment", "motion_quality", "visual_quality"}``, each [B] fp32 on the videos'
    device. :meth:`segment_alignment` gives the per-segment TA.
    """

    names = ("text_alignment", "motion_quality", "visual_quality")

    def _measure(self, videos: torch.Tensor):
        batch, frames = videos.shape[:2]
        return measure(videos.reshape(batch * frames, *videos.shape[2:]))

    def segment_alignment(
        self,
        videos: torch.Tensor,
        prompts: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """TA of each segment: [B, K_max] fp32, NaN past a video's last segment."""
        batch, frames = videos.shape[:2]
        starts = segment_starts_for(prompts, metadata, frames)
        return text_alignment(self._measure(videos), prompts, starts, batch, frames)

    def __call__(
        self,
        videos: torch.Tensor,
        prompts: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        batch, frames = videos.shape[:2]
        starts = segment_starts_for(prompts, metadata, frames)
        obj = self._measure(videos)
        ta = text_alignment(obj, prompts, starts, batch, frames).nanmean(1)
        mq = motion_quality(obj, _segment_of_frame(starts, frames, videos.device))
        vq = visual_quality(videos.reshape(batch * frames, *videos.shape[2:]), obj)
        return {
            "text_alignment": ta.float(),
            "motion_quality": mq.float(),
            "visual_quality": vq.view(batch, frames).mean(1).float(),
        }
