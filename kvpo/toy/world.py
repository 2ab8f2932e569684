"""The procedural video world: one coloured shape moving on a black background.

A video follows a prompt sequence (:mod:`kvpo.toy.prompts`): segment ``k`` covers
``segment_frames[k]`` consecutive frames, during which the object has the segment's colour and
moves in the segment's direction at a constant speed. Colour and direction switch at the first
frame of the next segment (the toy aligns segments to blocks of 3 frames).

Rendering: pixel ``(x, y)`` (centre at ``(x + 0.5, y + 0.5)``) belongs to the object when

- circle:   ``(x - cx)^2 + (y - cy)^2 <= r^2``
- square:   ``max(|x - cx|, |y - cy|) <= 0.85 r``
- triangle (apex up): ``cy - r <= y <= cy + r`` and ``|x - cx| <= (y - cy + r) / 2``

with hard edges (object pixels take the exact palette colour, the background is 0). Their
bounding-box fill ratios, about pi/4, 1 and 1/2, are what the rewards use to tell shapes apart.

Motion: per video a radius ``r ~ U[5, 6]`` px and a speed ``~ U[0.8, 1.4]`` px/frame are drawn.
The start depends only on the first segment's direction, so that the first block is nearly
determined by its prompt (a non-distilled 4-step sampler averages over an uncertain start and
draws blur): on the motion axis the object starts at the border opposite its motion (centre at
``r + margin`` from that border) plus ``U[0, 2]`` px inwards; on the other axis at the frame
centre plus ``U[-2, 2]`` px. The speed is lowered so the whole path from that start stays inside
the free range (not below 0.6 px/frame); where the path still reaches a border (long videos)
the object bounces off it (reflection of position and velocity on that axis). Everything is a
deterministic function of the seed.

Frames are returned in [0, 1]; the toy model works on ``2 * frame - 1`` in [-1, 1] directly as
its latents (3 channels, no VAE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvpo.toy.prompts import COLOURS, DIRECTIONS, Segment, sample_sequence, story_text


@dataclass(frozen=True)
class WorldConfig:
    """Geometry and motion ranges of the world."""

    height: int = 32
    width: int = 32
    radius: tuple[float, float] = (5.0, 6.0)
    speed: tuple[float, float] = (0.8, 1.4)
    min_speed: float = 0.6
    margin: float = 1.0
    start_jitter: float = 2.0


@dataclass
class Video:
    """One generated video.

    frames: [T, 3, H, W] fp32 in [0, 1]. centres: [T, 2] fp32 (x, y) in pixels.
    segment_starts: first frame of each segment (``segment_starts[0] == 0``).
    """

    frames: torch.Tensor
    centres: torch.Tensor
    segments: list[Segment]
    segment_starts: list[int]
    radius: float
    speed: float


def shape_mask(shape: str, centres: torch.Tensor, radius: float, height: int, width: int):
    """Hard-edged object masks. centres: [T, 2] (x, y) fp32 -> [T, H, W] bool."""
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5
    dx = xs - centres[:, 0].view(-1, 1, 1)
    dy = ys - centres[:, 1].view(-1, 1, 1)
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= 0.85 * radius
    if shape == "triangle":
        return (dy >= -radius) & (dy <= radius) & (dx.abs() <= (dy + radius) / 2)
    raise ValueError(f"shape must be circle, square or triangle, got {shape!r}")


def _path(
    velocities: np.ndarray, start: np.ndarray, lo: np.ndarray, hi: np.ndarray, seg_of_step
) -> np.ndarray:
    """Integrate per-step velocities [T-1, 2] from ``start``, reflecting at [lo, hi] per axis."""
    pos = [start.copy()]
    flip = np.ones(2)
    for t, v in enumerate(velocities):
        if t > 0 and seg_of_step[t] != seg_of_step[t - 1]:
            flip = np.ones(2)
        p = pos[-1] + v * flip
        for axis in range(2):
            if p[axis] < lo[axis]:
                p[axis], flip[axis] = 2 * lo[axis] - p[axis], -flip[axis]
            elif p[axis] > hi[axis]:
                p[axis], flip[axis] = 2 * hi[axis] - p[axis], -flip[axis]
        pos.append(p)
    return np.stack(pos)


def generate_video(
    segments: list[Segment],
    segment_frames: list[int],
    seed: int,
    config: WorldConfig = WorldConfig(),  # noqa: B008 (frozen dataclass)
) -> Video:
    """Render one video of ``sum(segment_frames)`` frames following ``segments``."""
    if len(segments) != len(segment_frames) or min(segment_frames, default=0) < 1:
        raise ValueError(
            f"expected one positive frame count per segment, got {len(segments)} segments "
            f"and frame counts {segment_frames}"
        )
    rng = np.random.default_rng(seed)
    radius = float(rng.uniform(*config.radius))
    speed = float(rng.uniform(*config.speed))
    jitter = rng.uniform(-1.0, 1.0, size=2) * config.start_jitter
    num_frames = sum(segment_frames)
    seg_of_frame = np.repeat(np.arange(len(segments)), segment_frames)
    unit = np.array([DIRECTIONS[segments[k].direction] for k in seg_of_frame[1:]]).reshape(-1, 2)
    offsets = np.concatenate([np.zeros((1, 2)), np.cumsum(unit, axis=0)])
    lo = np.full(2, radius + config.margin)
    hi = np.array([config.width, config.height]) - radius - config.margin
    first = np.array(DIRECTIONS[segments[0].direction])
    start = np.where(
        first > 0,
        lo + np.abs(jitter),
        np.where(first < 0, hi - np.abs(jitter), (lo + hi) / 2 + jitter),
    )
    ahead, behind = offsets.max(0), -offsets.min(0)
    room = np.concatenate(
        [(hi - start)[ahead > 0] / ahead[ahead > 0], (start - lo)[behind > 0] / behind[behind > 0]]
    )
    if room.size:
        speed = min(speed, max(float(room.min()), config.min_speed))
    centres_np = _path(speed * unit, start, lo, hi, seg_of_frame[1:])
    centres = torch.from_numpy(centres_np).float()

    mask = shape_mask(segments[0].shape, centres, radius, config.height, config.width)
    rgb = torch.tensor([COLOURS[segments[k].colour] for k in seg_of_frame], dtype=torch.float32)
    frames = mask.unsqueeze(1).float() * rgb.view(num_frames, 3, 1, 1)
    starts = np.concatenate([[0], np.cumsum(segment_frames)[:-1]]).tolist()
    return Video(frames, centres, list(segments), [int(s) for s in starts], radius, speed)


def segment_starts(num_segments: int, num_blocks: int, frames_per_block: int = 3) -> list[int]:
    """Block-aligned even split: segment ``k`` starts at block ``floor(k * blocks / K + 1/2)``."""
    if not 1 <= num_segments <= num_blocks:
        raise ValueError(f"need 1 <= segments <= blocks, got {num_segments} and {num_blocks}")
    return [
        int(k * num_blocks / num_segments + 0.5) * frames_per_block for k in range(num_segments)
    ]


def split_blocks(rng: np.random.Generator, num_blocks: int, num_segments: int, min_blocks: int):
    """A random composition of ``num_blocks`` into ``num_segments`` parts of >= ``min_blocks``."""
    spare = num_blocks - num_segments * min_blocks
    if spare < 0:
        raise ValueError(
            f"{num_segments} segments of >= {min_blocks} blocks need {num_segments * min_blocks} "
            f"blocks, the video has {num_blocks}"
        )
    cuts = np.sort(rng.integers(0, spare + 1, size=num_segments - 1))
    extra = np.diff(np.concatenate([[0], cuts, [spare]]))
    return [int(min_blocks + e) for e in extra]


def sample_batch(
    batch: int,
    num_blocks: int,
    seed: int,
    split: str = "train",
    block_frames: int = 3,
    max_segments: int = 3,
    min_segment_blocks: int = 2,
    config: WorldConfig = WorldConfig(),  # noqa: B008 (frozen dataclass)
):
    """Draw ``batch`` random videos of ``num_blocks * block_frames`` frames.

    Returns (frames [B, T, 3, H, W] fp32 in [0, 1], stories list[str] of length B,
    segment_starts list[list[int]] of frame indices). Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    top = max(1, min(max_segments, num_blocks // min_segment_blocks))
    frames, stories, starts = [], [], []
    for _ in range(batch):
        k = int(rng.integers(1, top + 1))
        blocks = split_blocks(rng, num_blocks, k, min_segment_blocks)
        segments = sample_sequence(rng, k, split)
        video = generate_video(
            segments, [b * block_frames for b in blocks], int(rng.integers(2**31)), config
        )
        frames.append(video.frames)
        stories.append(story_text(segments))
        starts.append(video.segment_starts)
    return torch.stack(frames), stories, starts
