"""``kvpo study`` (``python -m kvpo.study``): KV routing against noise-based exploration.

On ``prompts x seeds`` held-out (prompt, seed) pairs, one group per exploration mode with the
same model, prompts, fork and shared noise (:mod:`kvpo.study.groups`), measured for diversity,
staying on the data manifold, learning signal and the attention the window puts on the routed
frames (:mod:`kvpo.study.attention`); optionally a short training run per mode and its held-out
gain. Writes ``study.md``, ``study.json``, plots and one branch grid per mode into ``--out``
(:mod:`kvpo.study.report`) and prints the table. The results on the shipped toy model and what
they mean: docs/study.md.

    kvpo study                                    # toy default: 8 prompts x 2 seeds, 4 modes
    kvpo study --train-steps 50                   # also train 50 steps (100 rollouts) per mode
    kvpo study --modes kv_routing,noise_injection m_nearest_frames=3 cpu_threads=1

Trainer config keys are ``key=value`` overrides as for ``kvpo train``; they apply to every mode
(``exploration`` is set per mode). On a CPU the study runs ``cpu_threads`` torch threads, 1 when
it is 0 (torch's default of one thread per core is several times slower on shared cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvpo.method.exploration import EXPLORATION_MODES
from kvpo.study import report
from kvpo.study.attention import AttentionMass
from kvpo.study.groups import STEP_OFFSET, aggregate, run_mode
from kvpo.training.config import ConfigError
from kvpo.training.config_parse import load_config
from kvpo.training.distributed import DistInfo, resolve_device
from kvpo.training.validation import is_toy_dir, validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpo study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config (the trainer's keys); default: toy run")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt (default 2)")
    parser.add_argument(
        "--modes", default=",".join(EXPLORATION_MODES), help="comma-separated exploration modes"
    )
    parser.add_argument("--out", default="runs/study", help="output directory (runs/study)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="also train this many training steps (of sync_every rollouts) per mode (0: no)",
    )
    parser.add_argument(
        "--no-attention", action="store_true", help="skip the attention-mass measurement"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def train_gain(cfg, mode: str, steps: int, out: Path) -> dict:
    """Held-out gain (paired after - before per component and total) of a ``steps``-step
    training run in ``mode`` (:class:`~kvpo.training.trainer.KVPOTrainer`)."""
    from kvpo.training.trainer import KVPOTrainer

    run_cfg = replace(
        cfg, exploration=mode, max_train_steps=steps, output_dir=str(out / "train"),
        run_name=mode.replace("+", "_"), sample_interval_steps=0, show_progress=False,
    )  # fmt: skip
    summary = KVPOTrainer(run_cfg).train()
    return {s["name"]: s for s in summary["heldout"]}


def gain_table(gains: dict[str, dict]) -> str:
    names = list(next(iter(gains.values())))
    lines = ["| mode | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for mode, stats in gains.items():
        cells = [f"{stats[n]['diff']:+.4f} +- {stats[n]['se']:.4f}" for n in names]
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
        bad = [m for m in modes if m not in EXPLORATION_MODES]
        if bad or not modes:
            raise ConfigError(f"--modes must name modes among {EXPLORATION_MODES}, got {bad}")
        for mode in modes:
            replace(cfg, exploration=mode).exploration_config()
        if args.prompts < 1 or args.seeds < 1:
            raise ConfigError("--prompts and --seeds must be >= 1")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the toy's small GEMMs: one thread is fastest on shared cores
        torch.set_num_threads(cfg.cpu_threads or 1)
    try:
        return run(args, cfg, modes, device)
    finally:
        torch.set_num_threads(threads)


def run(args, cfg, modes: list[str], device) -> int:
    """The study (see the module docstring) with parsed arguments."""
    from kvpo.training.trainer import build_learner

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    learner = build_learner(cfg, DistInfo(device=device))
    world = None
    if cfg.generator_ckpt is None or is_toy_dir(cfg.generator_ckpt):
        from kvpo.toy.model import load_toy_model

        world = load_toy_model(cfg.generator_ckpt).config.world
    prompts = learner.prompts.heldout(args.prompts)
    pairs = [(p, s) for p in range(len(prompts)) for s in range(args.seeds)]
    hook = None
    if not args.no_attention and cfg.rows_per_batch == cfg.K + 1:
        hook = AttentionMass(cfg.cache_policy(), cfg.model_kwargs.sink_size, cfg.m_nearest_frames)
        learner.stream.context_hook = hook
    groups, aggregates, attention, timings, anchors = {}, {}, {}, {}, {}
    for mode in modes:
        t0 = time.perf_counter()
        groups[mode], first, att = run_mode(
            learner, mode, pairs, prompts, world=world, hook=hook, anchors=anchors
        )
        timings[mode] = time.perf_counter() - t0
        aggregates[mode] = aggregate(groups[mode])
        if att is not None:
            attention[mode] = att
        fork = learner.video_model.video_frame(groups[mode][first["pair"]]["fork"])
        report.write_grid(first, fork, out / f"branches_{mode.replace('+', '_')}.png")
        shown = pairs[first["pair"]]
        print(f"{mode}: {len(pairs)} groups in {timings[mode]:.1f} s", flush=True)
    learner.stream.context_hook = None
    gains = {}
    for mode in modes if args.train_steps > 0 else ():
        t0 = time.perf_counter()
        gains[mode] = train_gain(cfg, mode, args.train_steps, out)
        timings[f"train {mode}"] = time.perf_counter() - t0
    rows = report.reward_rows(aggregates)
    text = [
        f"# Exploration study: {len(pairs)} groups per mode ({len(prompts)} held-out prompts x "
        f"{args.seeds} seeds, G = {cfg.K}); mean +- SE over groups",
        "",
        report.table(aggregates, rows),
    ]
    if attention:
        text += ["", "Attention mass per layer (L0 / L1 / ...), window blocks:", ""]
        text.append(report.attention_table(attention))
        report.attention_plot(attention, out / "attention_mass.png")
    if gains:
        text += ["", f"Held-out gain after {args.train_steps} steps (after - before +- SE):", ""]
        text.append(gain_table(gains))
    p, seed = shown
    story = " / ".join(prompts[p])
    text += ["", f"Branch grids (`branches_<mode>.png`): held-out prompt {p}, seed {seed} (the "
             f"pair whose anchor shows the object most often): {story}."]  # fmt: skip
    report.diversity_plot(groups, out / "diversity_vs_manifold.png")
    timings["total"] = time.perf_counter() - started
    text += ["", f"Wall time: {timings['total']:.0f} s."]
    (out / "study.md").write_text("\n".join(text) + "\n")
    settings = {
        "prompts": [list(p) for p in prompts], "seeds": args.seeds, "modes": modes,
        "step_offset": STEP_OFFSET, "train_steps": args.train_steps, "config": cfg.to_dict(),
    }  # fmt: skip
    report.write_json(
        out / "study.json",
        {"settings": settings, "aggregates": aggregates, "groups": groups,
         "attention": attention, "heldout_gain": gains, "seconds": timings},
    )  # fmt: skip
    print("\n".join(text))
    print(f"wrote {out}/study.md, study.json and plots")
    return 0
