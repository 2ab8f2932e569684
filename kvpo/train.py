"""``python -m kvpo.train``: KVPO training, from held-out evaluation to the summary table.

With no arguments it runs the built-in toy default on the CPU: loads the toy model shipped in
``kvpo/toy/weights``, evaluates held-out prompts, trains a LoRA adapter with KVPO, evaluates
again and prints each reward before and after with the paired difference and its standard error.

    python -m kvpo.train                                  # the toy default (configs/toy.yaml)
    python -m kvpo.train --config configs/longlive.yaml generator_ckpt=... data_path=...
    python -m kvpo.train max_train_steps=20 K=4 lr=1e-3  # key=value overrides (adapter.rank=8)
    python -m kvpo.train --resume runs/<run>             # continue a run bit for bit
    torchrun --nproc_per_node 2 -m kvpo.train            # one prompt group per rank

A run directory (``output_dir/run_name``) receives ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``checkpoints/``, ``adapter/`` (peft format), ``eval_before.json`` /
``eval_after.json``, ``summary.json``, ``reward_curve.png`` and ``samples/*.gif``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvpo.checkpoint import capture_rng, export_adapter, resolve_checkpoint
from kvpo.config import ConfigError, TrainConfig, help_text, load_config
from kvpo.config_checks import validate
from kvpo.distributed import (
    DistInfo,
    barrier,
    gather_objects,
    init_distributed,
    rank_seed,
    shutdown,
)
from kvpo.evaluation import evaluate
from kvpo.evaluation_stats import format_summary, paired_summary
from kvpo.generator import load_generator
from kvpo.metrics import (
    MetricsLogger,
    PhaseTimer,
    peak_memory_bytes,
    write_curve_png,
    write_video_grid_gif,
)
from kvpo.run_state import load_state, save_state
from kvpo.trainer import PHASES, KVPOTrainer, SkippedStep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kvpo.train",
        description=__doc__,
        epilog="configuration keys (set in --config YAML or as key=value):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys below); defaults: the toy run")
    parser.add_argument(
        "--resume",
        help="run directory or checkpoint to continue from (its config.yaml is the base config "
        "unless --config is given; overrides apply on top, e.g. a larger max_train_steps)",
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the config, print it resolved, and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _run_dir(cfg: TrainConfig, resume: str | None, info: DistInfo) -> Path:
    if resume is not None:
        return resolve_checkpoint(resume).parent.parent
    name = cfg.run_name or time.strftime("kvpo-%Y%m%d-%H%M%S")
    name = gather_objects(name, info)[0]  # rank 0's timestamp for every rank
    return Path(cfg.output_dir) / name


def _resumed_config(resume: str) -> Path | None:
    try:
        saved = resolve_checkpoint(resume).parent.parent / "config.yaml"
    except FileNotFoundError:
        return None  # validate() reports the missing checkpoint
    return saved if saved.is_file() else None


class Run:
    """The training run of one process: evaluation, the step loop, outputs."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, resume: str | None):
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.main = info.is_main
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "samples").mkdir(exist_ok=True)
            cfg.save(run_dir / "config.yaml")
        barrier(info)
        torch.manual_seed(rank_seed(cfg.seed, info.rank, stream=7))
        self.trainer = KVPOTrainer(cfg, load_generator(cfg, info.device), info)
        self.logger = MetricsLogger(run_dir, enabled=self.main, tensorboard=cfg.tensorboard)
        self.bars = cfg.show_progress and self.main
        if resume is not None:
            load_state(self.trainer, resume)

    def log(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    def evaluate(self, tag: str) -> dict[str, list[float]]:
        cfg, t = self.cfg, self.trainer
        path = self.run_dir / f"eval_{tag}.json"
        if path.is_file():  # resumed run: the evaluation was done before the interruption
            return json.loads(path.read_text())
        prompts = t.gen.heldout_prompts(cfg.eval_prompts)
        start = time.perf_counter()
        with t.ema_weights(cfg.eval_use_ema and tag != "before"):
            scores = evaluate(
                t.gen, t.cache, t.sampler, t.reward, prompts, cfg.eval_seeds, t.layout,
                base_seed=cfg.seed, info=self.info, batch=t.rows_per_batch,
                clip_len=cfg.long_reward_normal_clip_len,
                context_timestep=float(cfg.context_noise),
            )  # fmt: skip
        if self.main:
            path.write_text(json.dumps(scores))
        self.log(f"evaluation {tag}: {len(prompts)} prompts x {cfg.eval_seeds} seeds in "
                 f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        return scores

    def train(self) -> None:
        cfg, t = self.cfg, self.trainer
        bar = tqdm(total=cfg.max_train_steps, initial=t.counters.step, desc="KVPO",
                   unit="step", disable=not self.bars)  # fmt: skip
        for step in range(t.counters.step, cfg.max_train_steps):
            phases = tqdm(total=len(PHASES), desc=f"step {step}", leave=False,
                          disable=not self.bars)  # fmt: skip
            timer = PhaseTimer(self.info.device, phases)
            try:
                record = t.train_step(step, timer)
                t.counters.consecutive_skips = 0
            except SkippedStep as err:
                record = {"skipped": str(err)}
                t.counters.skipped += 1
                t.counters.consecutive_skips += 1
                self.log(f"step {step} skipped: {err}")
                if t.counters.consecutive_skips >= cfg.max_consecutive_skips:
                    raise RuntimeError(
                        f"{t.counters.consecutive_skips} consecutive steps skipped (last: {err}); "
                        "stopping. Lower lr, check the reward model, or raise "
                        "max_consecutive_skips."
                    ) from err
            finally:
                phases.close()
            t.counters.step = step + 1
            record["time"] = dict(timer.seconds)
            record["peak_memory_bytes"] = peak_memory_bytes(self.info.device)
            self._after_step(step, record, bar)
        bar.close()

    def _after_step(self, step: int, record: dict, bar) -> None:
        cfg, t = self.cfg, self.trainer
        rewards = gather_objects(
            (record.get("reward_global/total_mean"), record.get("reward_global/total_anchor"))
            if cfg.train_global
            else (record.get("reward_local/total_mean"), record.get("reward_local/total_anchor")),
            self.info,
        )
        done = [r for r in rewards if r[0] is not None]
        if done:
            branch = sum(r[0] for r in done) / len(done)
            anchor = sum(r[1] for r in done) / len(done)
            t.counters.history.append([step, branch, anchor])
            bar.set_postfix(reward=f"{branch:.3f}", loss=f"{record.get('loss', float('nan')):.3g}")
        if (step + 1) % cfg.log_interval == 0 or "skipped" in record:
            self.logger.log(step, record)
        bar.update(1)
        if cfg.sample_interval_steps and (step + 1) % cfg.sample_interval_steps == 0 and self.main:
            write_video_grid_gif(
                self.run_dir / "samples" / f"step{step + 1:05d}.gif", t.last_videos
            )
        if cfg.eval_interval_steps and (step + 1) % cfg.eval_interval_steps == 0:
            scores = self.evaluate(f"step{step + 1:05d}")
            self.logger.log(step, {"eval": {k: sum(v) / len(v) for k, v in scores.items()}})
        if cfg.save_interval_steps and (step + 1) % cfg.save_interval_steps == 0:
            self.save()

    def save(self) -> None:
        state = save_state(self.trainer, self.run_dir, capture_rng(), write=self.main)
        barrier(self.info)
        if self.main and state is not None:
            export_adapter(self.trainer.model, self.run_dir / "adapter")

    def finish(self, before, after) -> dict | None:
        cfg, t = self.cfg, self.trainer
        if not self.main:
            return None
        curve = {"branches (mean)": [(h[0], h[1]) for h in t.counters.history],
                 "anchor": [(h[0], h[2]) for h in t.counters.history]}  # fmt: skip
        write_curve_png(self.run_dir / "reward_curve.png", curve, "training reward (total)")
        summary = {"steps": t.counters.step, "skipped": t.counters.skipped}
        if before is not None and after is not None:
            stats = paired_summary(before, after, cfg.reward_weights)
            summary["heldout"] = [s.to_dict() for s in stats]
            print(format_summary(stats, f"held-out rewards, {cfg.eval_prompts} prompts"))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"run directory: {self.run_dir}")
        return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = args.config
        if config is None and args.resume is not None:  # continue with the run's own config
            config = _resumed_config(args.resume)
        cfg = load_config(config, args.overrides)
        validate(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    info = init_distributed(cfg.device)
    try:
        run = Run(cfg, _run_dir(cfg, args.resume, info), info, args.resume)
        before = run.evaluate("before") if cfg.eval_before else None
        run.train()
        run.save()
        after = run.evaluate("after") if cfg.eval_after else None
        run.finish(before, after)
    finally:
        shutdown(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
