"""Rewards of generated videos: the local (forked chunk) and global (per-segment clips) signals.

Frames here are frames of the decoded video (:meth:`VideoLayout.mapped` converts a layout in
latent frames).

docs/method.md section 4: the **local** reward scores the chunk the group forked in; the **global**
reward scores the whole video as one clip per prompt segment, each with its own prompt (centred
in its segment, ``clip_len`` frames, or the whole segment when ``clip_len`` is 0), averaged over
the clips. A clip that spans prompt switches (possible for the local chunk) is scored with its
segments' prompts joined by ``", then "`` and ``metadata["segment_starts"]`` (clip-relative).

With transition clips on (:class:`GlobalReward`, ``long_reward_enable_transition``; the KVPO
authors' MemFlow ``_build_postfork_clip_specs``) the global reward also scores one clip of
``transition_clip_len`` frames centred at each prompt switch, with :data:`TRANSITION_PROMPT`, and
a video's global reward per component is ``(w_n mean(normal) + w_t mean(transition)) /
(w_n + w_t)`` (``w_t = 0`` when the video has no transition clip).

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


def clip_window(centre: int, num_frames: int, clip_len: int) -> tuple[int, int]:
    """Frames ``[lo, hi)``: ``clip_len`` frames from ``centre - clip_len // 2``, shifted back
    inside ``[0, num_frames)`` (the whole video when it is shorter than ``clip_len``)."""
    lo = max(0, min(centre - clip_len // 2, num_frames - clip_len))
    return lo, min(num_frames, lo + clip_len)


def global_clips(layout: VideoLayout, prompts: Sequence[str], clip_len: int = 0) -> list[Clip]:
    """One clip per prompt segment, centred in it (the whole segment when ``clip_len`` is 0)."""
    clips = []
    for k, (lo, hi) in enumerate(layout.segments(len(prompts))):
        if clip_len > 0:
            lo, hi = clip_window((lo + hi) // 2, layout.num_frames, clip_len)
        clips.append(Clip(lo, hi, prompts[k]))
    return clips


TRANSITION_PROMPT = (
    "Transition between two consecutive scenes. First part: {before} Second part: {after} "
    "Judge whether the transition is visually stable and motion is natural across the boundary."
)


def transition_clips(layout: VideoLayout, prompts: Sequence[str], clip_len: int) -> list[Clip]:
    """One clip of ``clip_len`` frames centred at each of the first ``len(prompts) - 1`` prompt
    switches inside the video, scored with :data:`TRANSITION_PROMPT` of the prompts before and
    after it; ``starts``: ``(0, switch - lo)`` (the second part's first frame in the clip)."""
    if clip_len < 1:
        raise ValueError(f"a transition clip needs clip_len >= 1 frames, got {clip_len}")
    clips = []
    for k, switch in enumerate(layout.switches[: len(prompts) - 1]):
        if not 0 < switch < layout.num_frames:
            continue
        lo, hi = clip_window(switch, layout.num_frames, clip_len)
        text = TRANSITION_PROMPT.format(before=prompts[k], after=prompts[k + 1])
        clips.append(Clip(lo, hi, text, (0, switch - lo) if switch > lo else (0,)))
    return clips


@dataclass(frozen=True)
class GlobalReward:
    """What the global reward scores and how its clips are weighted.

    ``clip_len``: frames of each segment's clip (0: the whole segment); ``transition``: also one
    clip of ``transition_clip_len`` frames at each prompt switch; ``normal_weight`` and
    ``transition_weight``: ``w_n`` and ``w_t`` of the weighted mean of the two kinds.
    """

    clip_len: int = 0
    transition: bool = False
    transition_clip_len: int = 48
    normal_weight: float = 1.0
    transition_weight: float = 0.5

    def clips(self, layout: VideoLayout, prompts: Sequence[str]) -> tuple[list[Clip], list[Clip]]:
        """``(segment clips, transition clips)`` of a video with ``prompts``."""
        normal = global_clips(layout, prompts, self.clip_len)
        if not self.transition:
            return normal, []
        return normal, transition_clips(layout, prompts, self.transition_clip_len)

    def score(
        self,
        reward: RewardFn,
        videos: torch.Tensor,
        layout: VideoLayout,
        prompts: Sequence[Sequence[str]],
        batch_size: int = 0,
    ) -> dict[str, torch.Tensor]:
        """``{name: [B] fp32}`` of ``videos [B, T, 3, H, W]`` (``prompts[b]``: video ``b``'s
        segment prompts; the same number for every video): the mean over the segment clips,
        or with transition clips ``(w_n mean(segment) + w_t mean(transition)) / (w_n + w_t)``."""
        normal, transition = zip(*(self.clips(layout, seq) for seq in prompts))
        scores = score_clips(reward, videos, normal, batch_size)
        if not transition[0]:  # w_t = 0: the normal weight divides out
            if self.normal_weight <= 0:
                raise ValueError(
                    "the global reward's weights sum to 0: long_reward_normal_weight must be > 0 "
                    f"when a video has no transition clip, got {self.normal_weight}"
                )
            return scores
        w_n, w_t = self.normal_weight, self.transition_weight
        if w_n + w_t <= 0:
            raise ValueError(
                f"the global reward's weights must sum to > 0, got long_reward_normal_weight "
                f"{w_n} + long_reward_transition_weight {w_t}"
            )
        extra = score_clips(reward, videos, transition, batch_size)
        return {k: (w_n * v + w_t * extra[k]) / (w_n + w_t) for k, v in scores.items()}


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


def split_anchor(scores: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``({name: [G]}, {name: scalar})``: the branches' and the anchor's scores of a group's
    ``{name: [G + 1]}`` (the anchor last)."""
    return {k: v[:-1] for k, v in scores.items()}, {k: v[-1] for k, v in scores.items()}
