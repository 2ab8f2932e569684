"""Held-out evaluation: the same prompts and noise before and after training, scored alike.

Each held-out video is a ``(prompt sequence, seed)`` pair, generated unrouted from the start (the
deployment setting: sink + window cache, prompt switches with recache) by
:meth:`kvpo.streaming.StreamingGenerator.videos` with noise from
:func:`kvpo.streaming.heldout_seed` ``(base seed, prompt index, seed index)`` only, so a video
before and after training differs only by the weights. It is scored with the global reward (one
clip per segment, its own prompt, and with transition clips one per prompt switch;
:class:`kvpo.rewards.clips.GlobalReward`). Pairs are split over ranks
(:func:`rank_pairs`) and gathered. ``kvpo evaluate`` and the trainer both call :func:`evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvpo.rewards.clips import GlobalReward
from kvpo.rewards.registry import select_components
from kvpo.streaming import StreamingGenerator, heldout_seed
from kvpo.training.distributed import DistInfo, gather_objects


def eval_pairs(num_prompts: int, num_seeds: int) -> list[tuple[int, int]]:
    """Every ``(prompt index, seed index)`` pair, prompt-major."""
    return [(p, s) for p in range(num_prompts) for s in range(num_seeds)]


def rank_pairs(pairs: Sequence, rank: int, world_size: int) -> list:
    """The pairs rank ``rank`` of ``world_size`` evaluates: every ``world_size``-th from
    ``rank`` (each pair on exactly one rank; counts differ by at most one)."""
    return list(pairs[rank::world_size])


def evaluate(
    stream: StreamingGenerator,
    reward,
    prompts: Sequence[Sequence[str]],
    num_seeds: int,
    *,
    base_seed: int,
    info: DistInfo,
    batch: int = 16,
    global_reward: GlobalReward | None = None,
    components: Sequence[str] | None = None,
    videos_per_call: int = 0,
) -> dict[str, list[float]]:
    """Reward components of every ``(prompt, seed)`` pair, in :func:`eval_pairs` order.

    ``batch``: videos generated at once (rows of ``stream``'s cache); ``videos_per_call``: videos
    per reward call (0: the ``batch``); ``components``: the components reported (the run's
    ``eval_reward_components``; None: every one the reward returns); ``global_reward``: the
    clips and weights (the run's ``cfg.global_reward()``; None: whole segments, no transitions).
    """
    global_reward = global_reward or GlobalReward()
    pairs = eval_pairs(len(prompts), num_seeds)
    mine = rank_pairs(pairs, info.rank, info.world_size)
    layout = stream.layout.mapped(stream.model.video_frame)
    scores: dict[tuple[int, int], dict[str, float]] = {}
    for b0 in range(0, len(mine), batch):
        chunk = mine[b0 : b0 + batch]
        seqs = [prompts[p] for p, _ in chunk]
        seeds = [heldout_seed(base_seed, p, s) for p, s in chunk]
        videos = stream.videos(seqs, seeds)
        values = global_reward.score(reward, videos, layout, seqs, videos_per_call)
        if components is not None:
            values = select_components(values, components, "eval_reward_components")
        for i, pair in enumerate(chunk):
            scores[pair] = {k: float(v[i]) for k, v in values.items()}
    merged: dict = {}
    for part in gather_objects(scores, info):
        merged.update(part)
    names = list(merged[pairs[0]])
    return {name: [merged[pair][name] for pair in pairs] for name in names}
