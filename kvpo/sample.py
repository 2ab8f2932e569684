"""Sample videos from the toy model and score them: ``kvpo sample prompt="..."``.

Generation goes through :class:`kvpo.streaming.StreamingGenerator` (:func:`sample_videos`): a
story's segments switch at the blocks :func:`kvpo.toy.world.segment_starts` gives, and a video's
noise comes from its seed alone.

Each ``--prompt`` is one segment of the video, in order (a prompt may also hold several
``", then "`` clauses); the segments switch at block boundaries with a KV recache. Writes, per
sample, ``<name>.gif`` and ``<name>.mp4`` (H.264, through imageio-ffmpeg), one
``contact_sheet.png`` (a row of frames per sample), and prints the rewards
(text alignment per segment, motion quality, visual quality; see :mod:`kvpo.toy.rewards`).

Examples::

    python -m kvpo.sample --prompt "a red circle moves left" --prompt "it turns blue and moves up"
    python -m kvpo.sample --samples 4 --num-blocks 16 --out samples/long
    python -m kvpo.sample --lora runs/<run>/lora.safetensors --prompt "a green square moves down"
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from kvpo.models.sampler import FlowSchedule
from kvpo.outputs.media import contact_sheet, to_uint8, write_video
from kvpo.rewards.clips import VideoLayout
from kvpo.rewards.registry import build_reward, score
from kvpo.streaming import StreamingGenerator
from kvpo.toy.model import ToyModel, load_toy_model
from kvpo.toy.prompts import heldout_prompts, parse_prompt, segment_text, story_text
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kvpo.sample",
        description="Sample toy videos, write GIF/MP4 + a contact sheet, print rewards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="one segment of the video, repeatable, in order; default: the first held-out story",
    )
    parser.add_argument("--samples", type=int, default=2, help="videos (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first video's noise")
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="blocks of 3 frames per video (default: the toy's 8)",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="toy model directory (model.safetensors + config.json); "
        "default: the weights shipped in kvpo/toy/weights",
    )
    parser.add_argument("--lora", default=None, help="LoRA weights to apply (peft format)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default rank)")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--name", default="sample", help="file name stem")
    parser.add_argument("--fps", type=float, default=6.0, help="frames per second of GIF/MP4")
    parser.add_argument("--scale", type=int, default=4, help="pixel upscaling of the outputs")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    story = ", then ".join(args.prompt) if args.prompt else heldout_prompts(1)[0]
    story = story_text(parse_prompt(story))
    model = load_toy_model(args.checkpoint, device=args.device)
    if args.lora:
        from kvpo.models.lora import import_lora

        rank = import_lora(model.wan, args.lora, alpha=args.lora_alpha)
        print(f"LoRA {args.lora} (rank {rank}) applied")
    seeds = list(range(args.seed, args.seed + args.samples))
    videos, starts = sample_videos(model, [story] * len(seeds), seeds, args.num_blocks)
    reward = build_reward("toy")
    meta = {"segment_starts": starts}
    scores = score(reward, videos, [story] * len(seeds), meta)
    per_segment = reward.segment_alignment(videos, [story] * len(seeds), meta)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"prompt: {story}\nsegments start at frames {starts[0]}")
    sheets = []
    for i, seed in enumerate(seeds):
        frames = to_uint8(videos[i], args.scale)
        sheets.append(frames)
        files = [p.name for p in write_video(frames, out / f"{args.name}_{seed}", args.fps)]
        segs = ", ".join(f"{v:.3f}" for v in per_segment[i].tolist())
        print(
            f"seed {seed}: "
            + "  ".join(f"{k} {v[i].item():.3f}" for k, v in scores.items())
            + f"  (per segment TA: {segs})  -> {', '.join(files)}"
        )
    contact_sheet(sheets).save(out / f"{args.name}_contact_sheet.png")
    means = "  ".join(f"{k} {v.mean().item():.3f}" for k, v in scores.items())
    print(f"mean over {len(seeds)} samples: {means}")
    print(f"contact sheet: {out / args.name}_contact_sheet.png")


if __name__ == "__main__":
    main()
