"""Held-out evaluation: the same prompts and noise before and after training, scored alike.

Each held-out video is a ``(prompt sequence, seed)`` pair: generated unrouted from the start
(the deployment setting: sink + window cache, prompt switches with recache) with noise drawn
from ``(base seed, prompt index, seed index)`` only, so the video before and after training
differs only by the weights. It is scored with the global reward (one clip per segment, its own
prompt; :mod:`kvpo.scoring`). Pairs are split over ranks and gathered. ``layout`` is in latent
frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpo.distributed import DistInfo, gather_objects, rank_seed
from kvpo.generator import Generator
from kvpo.models import FewStepSampler, FrameCache, generate
from kvpo.rollout import GroupNoise, switch_texts
from kvpo.scoring import RewardFn, VideoLayout, global_clips, score_clips


def eval_pairs(num_prompts: int, num_seeds: int) -> list[tuple[int, int]]:
    return [(p, s) for p in range(num_prompts) for s in range(num_seeds)]


@torch.no_grad()
def generate_videos(
    gen: Generator,
    cache: FrameCache,
    sampler: FewStepSampler,
    prompts: Sequence[Sequence[str]],
    seeds: Sequence[int],
    layout: VideoLayout,
    context_timestep: float = 0.0,
) -> torch.Tensor:
    """Unrouted videos ``[B, T, 3, H, W]`` in [0, 1] for ``prompts[i]`` with noise seed
    ``seeds[i]`` (one batch of rows; every sequence has the same number of segments)."""
    B, T = len(prompts), layout.num_frames
    segments = len(prompts[0])
    # one TextContext per segment holding the B rows' prompts
    texts = [gen.encode([p[k] for p in prompts]) for k in range(segments)]
    device, dtype = gen.wan.device, gen.wan.dtype
    noises = [
        GroupNoise.draw(
            s,
            (gen.latent_shape[0], T, *gen.latent_shape[1:]),
            sampler.schedule.num_steps,
            device,
            dtype,
        )
        for s in seeds
    ]
    noise = torch.cat([n.noise for n in noises])
    renoise = torch.cat([n.renoise for n in noises], dim=1)
    rows = cache.new_rows(B)
    try:
        out = generate(
            gen.wan,
            cache,
            rows,
            texts[0],
            noise,
            sampler=sampler,
            renoise=renoise,
            switches=switch_texts(texts, layout.switches, 0, T, include_lo=False),
            context_timestep=context_timestep,
        )
    finally:
        cache.free(rows)
    return gen.decode(out.latents)


def evaluate(
    gen: Generator,
    cache: FrameCache,
    sampler: FewStepSampler,
    reward: RewardFn,
    prompts: Sequence[Sequence[str]],
    num_seeds: int,
    layout: VideoLayout,
    *,
    base_seed: int,
    info: DistInfo,
    batch: int = 16,
    clip_len: int = 0,
    context_timestep: float = 0.0,
) -> dict[str, list[float]]:
    """Reward components of every ``(prompt, seed)`` pair, in :func:`eval_pairs` order."""
    pairs = eval_pairs(len(prompts), num_seeds)
    mine = pairs[info.rank :: info.world_size]
    scores: dict[tuple[int, int], dict[str, float]] = {}
    for b0 in range(0, len(mine), batch):
        chunk = mine[b0 : b0 + batch]
        seqs = [prompts[p] for p, _ in chunk]
        seeds = [rank_seed(base_seed, 10_000 + p, stream=s) for p, s in chunk]
        videos = generate_videos(gen, cache, sampler, seqs, seeds, layout, context_timestep)
        clips = [global_clips(layout.mapped(gen.video_frame), seq, clip_len) for seq in seqs]
        values = score_clips(reward, videos, clips)
        for i, pair in enumerate(chunk):
            scores[pair] = {k: float(v[i]) for k, v in values.items()}
    merged: dict = {}
    for part in gather_objects(scores, info):
        merged.update(part)
    names = list(merged[pairs[0]])
    return {name: [merged[pair][name] for pair in pairs] for name in names}
