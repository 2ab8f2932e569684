"""Rewards of generated videos: the local (forked chunk) and global (per-segment clips) signals.

Frames here are frames of the decoded video (:meth:`VideoLayout.mapped` converts a layout in
latent frames).

docs/method.md section 4: the **local** reward scores the chunk the group forked in; the **global**
reward scores the whole video as one clip per prompt segment, each with its own prompt (centred
in its segment, ``clip_len`` frames, or the whole segment when ``clip_len`` is 0), averaged over
the clips. A clip that spans prompt switches (possible for the local chunk) is scored with its
segments' prompts joined by ``", then "`` and ``metadata["segment_starts"]`` (clip-relative).

Reward models follow :mod:`kvpo.rewards.registry`: ``(videos [B, T, 3, H, W] in [0, 1], prompts,
metadata) -> {name: [B] fp32}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

RewardFn = Callable[..., dict[str, torch.Tensor]]


@dataclass(frozen=True)
class VideoLayout:
    """Frames of a video and where its prompt segments start (``switches``: frames > 0)."""

    num_frames: int
    switches: tuple[int, ...] = ()

    def segment_of(self, frame: int) -> int:
        return sum(1 for s in self.switches if s <= frame)

    def mapped(self, frame: Callable[[int], int]) -> VideoLayout:
        """The same layout with every frame boundary mapped by ``frame`` (latent -> video)."""
        return VideoLayout(frame(self.num_frames), tuple(frame(s) for s in self.switches))

    def segments(self, num_prompts: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` frames of each of the first ``num_prompts`` segments (the last one runs
        to the end of the video)."""
        bounds = [0, *self.switches[: num_prompts - 1], self.num_frames]
        return list(zip(bounds, bounds[1:]))


@dataclass(frozen=True)
class Clip:
    """Frames ``[lo, hi)`` scored with ``prompt``; ``starts``: clip-relative segment starts."""

    lo: int
    hi: int
    prompt: str
    starts: tuple[int, ...] = (0,)


def clip_for(layout: VideoLayout, prompts: Sequence[str], lo: int, hi: int) -> Clip:
    """The clip ``[lo, hi)`` with the prompts of the segments it covers."""
    first, last = layout.segment_of(lo), layout.segment_of(hi - 1)
    last = min(last, len(prompts) - 1)
    first = min(first, last)
    texts = list(prompts[first : last + 1])
    starts = [0] + [s - lo for s in layout.switches[first:last]]
    return Clip(lo, hi, ", then ".join(texts), tuple(starts))


def local_reward_input(
    mode: str,
    model,
    latents: torch.Tensor,
    videos: torch.Tensor,
    layout: VideoLayout,
    prompts: Sequence[str],
    lo: int,
    hi: int,
) -> tuple[torch.Tensor, list[Clip]]:
    """The videos and the clip the local reward scores, for the latent chunk ``[lo, hi)``.

    Args:
        mode: ``"chunk"``: the chunk's latents decoded alone (the authors'
            ``_compute_rewards_short``: a causal VAE turns its first latent frame into one video
            frame, so 18 latent frames give 69); ``"slice"``: its frames cut from ``videos``.
        model: the video model (``decode``, ``video_frame``: :class:`kvpo.video_model.VideoModel`).
        latents: ``[B, C, T, H, W]``; videos: ``[B, T_video, 3, H, W]`` their whole decode.
        layout: the video layout in latent frames.

    Returns:
        ``(videos [B, T_clip, 3, H, W], [clip])``, the clip's frames and segment starts in the
        returned videos' frames.
    """
    frame = model.video_frame
    if mode == "slice":
        return videos, [clip_for(layout.mapped(frame), prompts, frame(lo), frame(hi))]
    if mode != "chunk":
        raise ValueError(f"local_reward_decode must be 'chunk' or 'slice', got {mode!r}")
    chunk = model.decode(latents[:, :, lo:hi])
    clip = clip_for(layout, prompts, lo, hi)  # latent frames, starts relative to lo
    starts = tuple(frame(s) for s in clip.starts)
    return chunk, [Clip(0, chunk.shape[1], clip.prompt, starts)]


def global_clips(layout: VideoLayout, prompts: Sequence[str], clip_len: int = 0) -> list[Clip]:
    """One clip per prompt segment, centred in it (the whole segment when ``clip_len`` is 0)."""
    clips = []
    for k, (lo, hi) in enumerate(layout.segments(len(prompts))):
        if clip_len > 0:
            centre = (lo + hi) // 2
            lo = max(0, min(centre - clip_len // 2, layout.num_frames - clip_len))
            hi = min(layout.num_frames, lo + clip_len)
        clips.append(Clip(lo, hi, prompts[k]))
    return clips


def score_clips(
    reward: RewardFn,
    videos: torch.Tensor,
    clips: Sequence[Sequence[Clip]],
    batch_size: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean over each video's clips of every reward component.

    ``videos [B, T, 3, H, W]``; ``clips[b]``: video ``b``'s clips, the same frame ranges for
    every video (prompts may differ). Scored in batches of ``batch_size`` videos (0: all).
    Returns ``{name: [B] fp32}``.
    """
    B = videos.shape[0]
    if len(clips) != B or len({len(c) for c in clips}) != 1:
        raise ValueError(f"need one equally long clip list per video ({B}), got {len(clips)}")
    step = batch_size or B
    total: dict[str, torch.Tensor] = {}
    for j, clip in enumerate(clips[0]):
        if any((c[j].lo, c[j].hi) != (clip.lo, clip.hi) for c in clips):
            raise ValueError(f"clip {j} covers different frames in different videos")
        pieces = []
        for b0 in range(0, B, step):
            rows = range(b0, min(b0 + step, B))
            pieces.append(
                reward(
                    videos[b0 : rows.stop, clip.lo : clip.hi],
                    [clips[b][j].prompt for b in rows],
                    {"segment_starts": [list(clips[b][j].starts) for b in rows]},
                )
            )
        for name in pieces[0]:
            value = torch.cat([p[name].float().reshape(-1) for p in pieces])
            total[name] = total.get(name, 0) + value / len(clips[0])
    return total
