"""Score a model on the held-out prompts: ``kvpo evaluate`` (``python -m kvpo.evaluate``).

The trainer's held-out evaluation, on its own: the same config keys (``--config`` and
``key=value`` overrides, as ``kvpo train``), the same prompts, noise, generation and scoring
(:func:`kvpo.training.heldout.evaluate`), so for the same weights it prints the numbers of a
run's ``eval_before.json``. Prints the mean and standard deviation of every reward component
over ``eval_prompts x eval_seeds`` videos as a markdown table, for the model and, for a toy model,
for a randomly initialised model of the same shape (seeded) and for the world's own videos of
the same stories (the ceiling of each reward).

    kvpo evaluate                                   # the shipped toy model, 16 x 2 videos
    kvpo evaluate lora_ckpt=runs/<run>/adapter/adapter_model.safetensors   # a trained adapter
    kvpo evaluate generator_ckpt=my_toy_weights eval_prompts=4 --json scores.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kvpo.models.lora import merge_lora_into_base
from kvpo.rewards.registry import resolve_reward, reward_options, select_components
from kvpo.streaming import stream_from_config
from kvpo.training.config import ConfigError, TrainConfig
from kvpo.training.config_parse import load_config
from kvpo.training.distributed import DistInfo, resolve_device
from kvpo.training.heldout import evaluate
from kvpo.training.prompts import config_prompt_source, prompt_source
from kvpo.training.validation import is_toy_dir, validate
from kvpo.video_model import VideoModel, load_video_model, toy_video_model


def model_scores(cfg: TrainConfig, model: VideoModel, info: DistInfo) -> dict[str, list[float]]:
    """``{component: [eval_prompts * eval_seeds]}`` of the ``eval_reward_components``: the
    trainer's held-out evaluation."""
    stream = stream_from_config(model, cfg, cfg.rows_per_batch)
    prompts = config_prompt_source(cfg).heldout(cfg.eval_prompts)
    reward = resolve_reward(cfg.reward_model, **reward_options(cfg))
    return evaluate(
        stream, reward, prompts, cfg.eval_seeds, base_seed=cfg.seed, info=info,
        batch=cfg.rows_per_batch, global_reward=cfg.global_reward(),
        components=list(cfg.eval_reward_weights), videos_per_call=cfg.reward_videos_per_call,
    )  # fmt: skip


def world_scores(cfg: TrainConfig) -> dict[str, list[float]]:
    """The same scores for the toy world's own videos of the held-out stories."""
    from kvpo.toy.prompts import parse_prompt
    from kvpo.toy.world import generate_video

    prompts = prompt_source(
        None, None, num_segments=len(cfg.switch_frames) + 1, eval_prompts=cfg.eval_prompts,
        seed=cfg.seed,
    ).heldout(cfg.eval_prompts)  # fmt: skip
    layout = cfg.latent_layout()
    bounds = [0, *layout.switches, layout.num_frames]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    videos, seqs = [], []
    for p, seq in enumerate(prompts):
        for s in range(cfg.eval_seeds):
            segments = [parse_prompt(text)[0] for text in seq]
            videos.append(generate_video(segments, lengths[: len(seq)], seed=1000 * p + s).frames)
            seqs.append(seq)
    reward = resolve_reward(cfg.reward_model, **reward_options(cfg))
    videos = torch.stack(videos)
    values = cfg.global_reward().score(reward, videos, layout, seqs, cfg.reward_videos_per_call)
    values = select_components(values, list(cfg.eval_reward_weights), "eval_reward_components")
    return {k: v.tolist() for k, v in values.items()}


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: one row per model, ``mean +- std`` per component."""
    names = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for label, scores in rows.items():
        cells = []
        for n in names:
            v = torch.tensor(scores[n], dtype=torch.float64)
            cells.append(f"{v.mean():.4f} +- {v.std() if len(v) > 1 else 0.0:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpo evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (the trainer's keys); default: toy run")
    parser.add_argument("--json", help="also write every score to this file")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the random-weight and world rows"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    info = DistInfo(device=resolve_device(cfg.device))
    model = load_video_model(cfg, info.device)
    if cfg.lora_ckpt is not None:  # as the trainer does: the LoRA becomes part of the weights
        merge_lora_into_base(model.wan, cfg.lora_ckpt, cfg.lora_ckpt_alpha)
    rows = {"model": model_scores(cfg, model, info)}
    toy = cfg.generator_ckpt is None or is_toy_dir(cfg.generator_ckpt)
    if toy and not args.no_baselines:
        from kvpo.toy.model import ToyModel, load_toy_model

        torch.manual_seed(0)
        config = load_toy_model(cfg.generator_ckpt).config
        fresh = toy_video_model(ToyModel(config).eval().to(info.device))
        rows["random weights"] = model_scores(cfg, fresh, info)
        rows["world (ground truth)"] = world_scores(cfg)
    print(f"held-out rewards: {cfg.eval_prompts} prompts x {cfg.eval_seeds} seeds")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
