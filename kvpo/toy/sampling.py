"""Sampling the toy model: stories in, RGB videos out, with the model's few-step sampler.

Each story (``"a red circle moves left, then it turns blue and moves up"``) is split into
segments at block boundaries by :func:`kvpo.toy.world.segment_starts` (the toy's default layout:
3 segments of 8 blocks switch at frames 9 and 15). Blocks are generated with
:func:`kvpo.models.sampler.generate` (4 steps with the toy's update rule, sink + window cache,
context pass at ``t = 0``); at a frame where any video's segment changes, every row switches to
its sentence in force there and the window is re-encoded (KV recache). Noise is drawn per video
from its seed, so a video does not depend on the other rows of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from kvpo.models.frame_cache import FrameCache
from kvpo.models.sampler import FewStepSampler, FlowSchedule, generate
from kvpo.toy.model import ToyModel
from kvpo.toy.prompts import parse_prompt, segment_text
from kvpo.toy.world import segment_starts


def video_noise(seeds: Sequence[int], steps: int, shape: tuple[int, ...]):
    """Initial noise [B, *shape] and re-noising noise [steps - 1, B, *shape], one seed per video."""
    noise, renoise = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        noise.append(torch.randn(shape, generator=gen))
        renoise.append(torch.randn((steps - 1, *shape), generator=gen))
    return torch.stack(noise), torch.stack(renoise, 1)


@torch.no_grad()
def sample_videos(
    model: ToyModel,
    stories: Sequence[str],
    seeds: Sequence[int],
    num_blocks: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Generate one video per story.

    Returns (videos [B, T, 3, H, W] fp32 in [0, 1] on the model's device, segment_starts: B lists
    of frame indices), ``T = num_blocks * frames_per_block`` (default: the toy's 8 blocks).
    """
    if len(stories) != len(seeds):
        raise ValueError(
            f"expected one seed per story, got {len(stories)} stories, {len(seeds)} seeds"
        )
    cfg = model.config
    num_blocks = num_blocks or cfg.num_blocks
    fpb, device = cfg.frames_per_block, model.wan.device
    schedule = FlowSchedule(cfg.denoising_step_list, shift=cfg.timestep_shift)
    sampler = FewStepSampler(schedule, rule=cfg.sampler_rule)
    timelines, starts = [], []
    for story in stories:
        segments = parse_prompt(story)
        s = segment_starts(len(segments), num_blocks, fpb)
        starts.append(s)
        timelines.append([(f, segment_text(seg)) for f, seg in zip(s, segments)])
    shape = (cfg.wan.in_channels, num_blocks * fpb, cfg.world.height, cfg.world.width)
    noise, renoise = video_noise(seeds, schedule.num_steps, shape)
    noise = noise.to(device)
    renoise = renoise.to(device) if cfg.sampler_rule == "x0" else None

    def sentences_at(frame: int) -> list[str]:
        return [[text for f, text in line if f <= frame][-1] for line in timelines]

    rows = len(stories)
    policy = cfg.cache_policy
    pages = rows * (policy.resident_frames + policy.local_attn_size + 2 * fpb)
    cache = FrameCache.create(cfg.wan, policy, pages, model.wan.dtype, device)
    row_ids = cache.new_rows(rows)
    latents = noise.new_empty(noise.shape)
    current = sentences_at(0)
    text = model.encode(current)
    for b in tqdm(range(num_blocks), desc="blocks", disable=not progress):
        f0, sl = b * fpb, slice(b * fpb, (b + 1) * fpb)
        wanted = sentences_at(f0)
        switches = None
        if wanted != current:
            current, text = wanted, model.encode(wanted)
            switches = {f0: text}
        out = generate(
            model.wan,
            cache,
            row_ids,
            text,
            noise[:, :, sl],
            sampler=sampler,
            renoise=None if renoise is None else renoise[:, :, :, sl],
            start_frame=f0,
            switches=switches,
            history=latents[:, :, :f0] if f0 else None,
        )
        latents[:, :, sl] = out.latents
    cache.free(row_ids)
    videos = ((latents.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)
    return videos.float(), starts
