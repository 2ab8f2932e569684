"""Score a toy model on the held-out stories: ``python -m kvpo.toy.evaluate [--checkpoint DIR]``.

Samples ``--prompts`` held-out stories (:func:`kvpo.toy.prompts.heldout_prompts`, 3 segments
each) with ``--seeds`` noise seeds each and prints the mean and standard deviation of every
reward component, for the model and for a randomly initialised model of the same shape (seeded),
as the markdown table of the model card. Also reports the ground-truth world videos of the same
stories (the ceiling of each reward).
"""

from __future__ import annotations

import argparse
import json

import torch

from kvpo.rewards import build_reward, score
from kvpo.toy.model import ToyModel, load_toy_model
from kvpo.toy.prompts import heldout_prompts, parse_prompt
from kvpo.toy.sampling import sample_videos
from kvpo.toy.world import generate_video, segment_starts


def reward_stats(
    videos: torch.Tensor, stories: list[str], starts
) -> dict[str, tuple[float, float]]:
    """(mean, std) of each toy reward component over the videos, plus the per-segment TA."""
    reward = build_reward("toy")
    meta = {"segment_starts": starts}
    out = score(reward, videos, stories, meta)
    per_seg = reward.segment_alignment(videos, stories, meta)
    for k in range(per_seg.shape[1]):
        out[f"text_alignment_segment_{k}"] = per_seg[:, k]
    return {name: (v.mean().item(), v.std().item()) for name, v in out.items()}


def evaluate(model: ToyModel, prompts: int, seeds: int, num_blocks: int | None = None) -> dict:
    """Held-out reward statistics of ``model`` (``prompts * seeds`` videos)."""
    stories = [s for s in heldout_prompts(prompts) for _ in range(seeds)]
    seed_list = [1000 + i for i in range(len(stories))]
    videos, starts = sample_videos(model, stories, seed_list, num_blocks, progress=True)
    return reward_stats(videos, stories, starts)


def world_stats(prompts: int, seeds: int, num_blocks: int = 8) -> dict:
    """The same statistics for the world's own videos of the held-out stories."""
    stories = [s for s in heldout_prompts(prompts) for _ in range(seeds)]
    videos, starts = [], []
    for i, story in enumerate(stories):
        segs = parse_prompt(story)
        s = segment_starts(len(segs), num_blocks)
        lengths = [b - a for a, b in zip(s, [*s[1:], num_blocks * 3])]
        videos.append(generate_video(segs, lengths, seed=1000 + i).frames)
        starts.append(s)
    return reward_stats(torch.stack(videos), stories, starts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpo.toy.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", default=None, help="toy model dir (default: shipped)")
    parser.add_argument("--prompts", type=int, default=16, help="held-out stories")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per story")
    parser.add_argument("--num-blocks", type=int, default=None, help="blocks per video")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_toy_model(args.checkpoint)
    torch.manual_seed(0)
    rows = {
        "pretrained": evaluate(model, args.prompts, args.seeds, args.num_blocks),
        "random weights": evaluate(
            ToyModel(model.config).eval(), args.prompts, args.seeds, args.num_blocks
        ),
        "world (ground truth)": world_stats(
            args.prompts, args.seeds, args.num_blocks or model.config.num_blocks
        ),
    }
    names = list(rows["pretrained"])
    print("| model | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 1) + "|")
    for label, stats in rows.items():
        cells = " | ".join(f"{stats[n][0]:.3f} +- {stats[n][1]:.3f}" for n in names)
        print(f"| {label} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
