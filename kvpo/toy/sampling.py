"""Sampling the toy model: stories in, RGB videos out, through the streaming generator.

Each story (``"a red circle moves left, then it turns blue and moves up"``) is split into
segments at block boundaries by :func:`kvpo.toy.world.segment_starts` (the toy's default layout:
3 segments of 8 blocks switch at frames 9 and 15); at a switch every row moves to its next
sentence and the window is re-encoded (KV recache). Generation is
:meth:`kvpo.streaming.StreamingGenerator.videos` with the toy's cache policy, schedule and update
rule, so a video's noise comes from its seed alone and does not depend on the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpo.models.sampler import FlowSchedule
from kvpo.rewards.clips import VideoLayout
from kvpo.streaming import StreamingGenerator
from kvpo.toy.model import ToyModel
from kvpo.toy.prompts import parse_prompt, segment_text
from kvpo.toy.world import segment_starts
from kvpo.video_model import toy_video_model


def toy_stream(model: ToyModel, layout: VideoLayout, rows: int) -> StreamingGenerator:
    """A streaming generator of the toy ``model`` over ``layout`` with ``rows`` rows."""
    cfg = model.config
    return StreamingGenerator(
        toy_video_model(model),
        cfg.cache_policy,
        FlowSchedule(cfg.denoising_step_list, shift=cfg.timestep_shift),
        rule=cfg.sampler_rule,
        layout=layout,
        context_timestep=cfg.context_noise,
        rows=rows,
    )


@torch.no_grad()
def sample_videos(
    model: ToyModel,
    stories: Sequence[str],
    seeds: Sequence[int],
    num_blocks: int | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Generate one video per story (every story with the same number of segments).

    Returns (videos [B, T, 3, H, W] fp32 in [0, 1] on the model's device, segment_starts: B lists
    of frame indices), ``T = num_blocks * frames_per_block`` (default: the toy's 8 blocks).
    """
    if len(stories) != len(seeds):
        raise ValueError(
            f"expected one seed per story, got {len(stories)} stories, {len(seeds)} seeds"
        )
    cfg = model.config
    num_blocks = num_blocks or cfg.num_blocks
    sequences = [[segment_text(s) for s in parse_prompt(story)] for story in stories]
    counts = {len(s) for s in sequences}
    if len(counts) != 1:
        raise ValueError(f"stories of one batch need equally many segments, got {sorted(counts)}")
    starts = segment_starts(counts.pop(), num_blocks, cfg.frames_per_block)
    layout = VideoLayout(num_blocks * cfg.frames_per_block, tuple(starts[1:]))
    videos = toy_stream(model, layout, len(stories)).videos(sequences, seeds)
    return videos.float(), [list(starts) for _ in stories]
