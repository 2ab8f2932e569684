"""The training run: :class:`KVPOTrainer` owns evaluation, the step loop, checkpoints and outputs.

    from kvpo import KVPOTrainer, TrainConfig

    trainer = KVPOTrainer(TrainConfig(max_train_steps=20), reward=my_reward, prompts=my_prompts)
    summary = trainer.train()      # evaluate, train, checkpoint, evaluate again, summarise

``model`` (a :class:`~kvpo.video_model.VideoModel`; default: loaded from ``generator_ckpt``),
``reward`` (a callable, a registered name or ``"pkg.module:Factory"``; default:
``reward_model``) and ``prompts`` (a :class:`~kvpo.training.prompts.PromptSource` or a list of
prompt sequences; default: ``data_path`` / the toy's) are constructor arguments.
``python -m kvpo.train`` is a thin command line over this class.

A run directory (``output_dir/run_name``) receives ``config.yaml`` (the resolved config),
``metrics.jsonl``, ``checkpoints/``, ``adapter/`` (peft format), ``eval_<tag>.json``,
``summary.json``, ``reward_curve.png``, ``training_curves.png`` and ``samples/`` (GIF + MP4 of
each sampled group, a branch-grid PNG of its fork window).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kvpo.outputs.loggers import MetricsLogger, read_metrics
from kvpo.outputs.media import branch_grid, branch_labels, side_by_side, write_video
from kvpo.outputs.plots import write_reward_curve, write_training_curves
from kvpo.outputs.progress import Progress
from kvpo.planning.choose import start_config
from kvpo.rewards.registry import resolve_reward, reward_options
from kvpo.training.checkpoint import capture_rng, export_adapter, resolve_checkpoint
from kvpo.training.config import TrainConfig
from kvpo.training.distributed import DistInfo, barrier, gather_objects, init_distributed, rank_seed
from kvpo.training.heldout import evaluate
from kvpo.training.learner import PHASES, Learner, SkippedStep
from kvpo.training.paired_stats import format_summary, paired_summary
from kvpo.training.phases import PhaseTimer, peak_memory_bytes
from kvpo.training.prompts import PromptSource, config_prompt_source
from kvpo.training.state import load_state, save_state
from kvpo.training.validation import validate
from kvpo.video_model import VideoModel, load_video_model


def run_directory(cfg: TrainConfig, resume: str | None, info: DistInfo) -> Path:
    """The run directory: the resumed run's, or ``output_dir/run_name`` (rank 0's timestamp
    when ``run_name`` is empty)."""
    if resume is not None:
        return resolve_checkpoint(resume).parent.parent
    name = cfg.run_name or time.strftime("kvpo-%Y%m%d-%H%M%S")
    name = gather_objects(name, info)[0]
    return Path(cfg.output_dir) / name


def build_learner(
    cfg: TrainConfig,
    info: DistInfo,
    *,
    model: VideoModel | None = None,
    reward=None,
    prompts: PromptSource | Sequence[Sequence[str]] | None = None,
) -> Learner:
    """The :class:`Learner` of ``cfg`` with the model, reward and prompts given or, where None,
    the config's (``generator_ckpt``, ``reward_model``, ``data_path`` / the toy's)."""
    if not isinstance(prompts, PromptSource):
        if prompts is not None:
            prompts = PromptSource.from_sequences(
                prompts, eval_prompts=cfg.eval_prompts, seed=cfg.seed
            )
        else:
            prompts = config_prompt_source(cfg, world_size=info.world_size)
    model = model or load_video_model(cfg, info.device)
    # row_micro_batch: auto -> the memory planner's choice for this device (one printed line)
    cfg = start_config(
        cfg, info.device, model.wan.config, log=print if info.is_main else (lambda _: None)
    )
    return Learner(
        cfg,
        model,
        info,
        reward=resolve_reward(
            reward if reward is not None else cfg.reward_model, **reward_options(cfg)
        ),
        prompts=prompts,
    )


class KVPOTrainer:
    """KVPO training of one process (one prompt group per rank and step).

    Args:
        config: the run's configuration (default: the built-in toy run).
        model: the video model to align (default: ``load_video_model(config)``).
        reward: reward model (default: ``config.reward_model``); see :mod:`kvpo.rewards`.
        prompts: a :class:`PromptSource`, or a list of prompt sequences (lists of segment
            strings; the last ``eval_prompts`` are held out), default from ``config``.
        resume: a run directory or checkpoint to continue from (bit for bit).
        info: rank and device (default: :func:`~kvpo.training.distributed.init_distributed`).

    The configuration is validated first (:class:`~kvpo.training.config.ConfigError` lists
    every problem before any work).
    """

    def __init__(
        self,
        config: TrainConfig | None = None,
        *,
        model: VideoModel | None = None,
        reward=None,
        prompts: PromptSource | Sequence[Sequence[str]] | None = None,
        resume: str | None = None,
        info: DistInfo | None = None,
    ) -> None:
        cfg = self.cfg = config or TrainConfig()
        validate(cfg, resume=resume)
        self.info = info or init_distributed(cfg.device)
        self.main = self.info.is_main
        self.run_dir = run_directory(cfg, resume, self.info)
        if self.main:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        barrier(self.info)
        torch.manual_seed(rank_seed(cfg.seed, self.info.rank, stream=7))
        self.learner = build_learner(cfg, self.info, model=model, reward=reward, prompts=prompts)
        self.logger = MetricsLogger(
            self.run_dir, enabled=self.main, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
            wandb_project=cfg.wandb_project, wandb_name=self.run_dir.name, config=cfg.to_dict(),
        )  # fmt: skip
        self.progress: Progress | None = None
        if resume is not None:
            load_state(self.learner, resume)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.write(message)
        elif self.main:
            print(message, flush=True)

    # ------------------------------------------------------------------ the run
    def train(self) -> dict | None:
        """Evaluate, train to ``max_train_steps``, checkpoint, evaluate again; returns the
        summary (rank 0; None elsewhere)."""
        cfg = self.cfg
        before = self.evaluate("before") if cfg.eval_before else None
        self.steps()
        self.save()
        after = self.evaluate("after") if cfg.eval_after else None
        return self.finish(before, after)

    def evaluate(self, tag: str) -> dict[str, list[float]]:
        """Held-out rewards ``{component: [pairs]}`` of the ``eval_reward_components``, saved
        as ``eval_<tag>.json`` (a resumed run reads the saved file instead of evaluating again)."""
        cfg, learner = self.cfg, self.learner
        path = self.run_dir / f"eval_{tag}.json"
        if path.is_file():
            return json.loads(path.read_text())
        prompts = learner.prompts.heldout(cfg.eval_prompts)
        start = time.perf_counter()
        with learner.ema_weights(cfg.eval_use_ema and tag != "before"):
            scores = evaluate(
                learner.stream, learner.reward, prompts, cfg.eval_seeds, base_seed=cfg.seed,
                info=self.info, batch=learner.rows_per_batch,
                global_reward=cfg.global_reward(), components=list(cfg.eval_reward_weights),
                videos_per_call=cfg.reward_videos_per_call,
            )  # fmt: skip
        if self.main:
            path.write_text(json.dumps(scores))
        self.log(f"evaluation {tag}: {len(prompts)} prompts x {cfg.eval_seeds} seeds in "
                 f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        return scores

    def steps(self) -> None:
        """Rollouts until ``max_train_steps`` training steps are done.

        A training step is ``sync_every`` rollouts (the KVPO authors'
        ``gradient_accumulation_steps``; :class:`~kvpo.training.learner.Counters`): a run makes
        ``max_train_steps * sync_every`` rollouts, skipped ones included. The metrics of each
        rollout are written (their ``step`` is the rollout's index, ``train_step`` the training
        step it belongs to) in the training steps ``log_interval`` divides; progress, samples,
        evaluation and checkpoints come at the end of a training step, every
        ``progress_interval`` / ``*_interval_steps`` training steps (as in the authors' loop), so
        a checkpoint is always taken right after an old-policy sync.
        """
        cfg, learner = self.cfg, self.learner
        counters = learner.counters
        self.progress = Progress(
            cfg.max_train_steps, initial=counters.step, every=cfg.progress_interval,
            enabled=self.main and cfg.show_progress,
        )  # fmt: skip
        try:
            while counters.step < cfg.max_train_steps:
                rollout, step = counters.rollouts, counters.step
                desc = f"step {step} rollout {counters.since_sync + 1}/{cfg.sync_every}"
                with self.progress.phases(PHASES, desc) as bar:
                    record = self._step(rollout, PhaseTimer(self.info.device, bar))
                record["train_step"] = step
                self._after_step(rollout, step, record)
        finally:
            self.progress.close()
            self.progress = None

    def _step(self, rollout: int, timer: PhaseTimer) -> dict:
        """Rollout ``rollout`` and its updates; a skipped rollout is counted all the same."""
        cfg, counters = self.cfg, self.learner.counters
        try:
            record = self.learner.train_step(rollout, timer)  # counts the rollout (end_rollout)
            counters.consecutive_skips = 0
        except SkippedStep as err:
            record = {"skipped": str(err)}
            self.learner.end_rollout()
            counters.skipped += 1
            counters.consecutive_skips += 1
            self.log(f"rollout {rollout} (training step {counters.step}) skipped: {err}")
            if counters.consecutive_skips >= cfg.max_consecutive_skips:
                raise RuntimeError(
                    f"{counters.consecutive_skips} consecutive steps skipped (last: {err}); "
                    "stopping. Lower lr, check the reward model, or raise max_consecutive_skips."
                ) from err
        record["time"] = dict(timer.seconds)
        record["peak_memory_bytes"] = peak_memory_bytes(self.info.device)
        return record

    def _after_step(self, rollout: int, step: int, record: dict) -> None:
        """Metrics of rollout ``rollout`` (of training step ``step``); at the end of a training
        step, progress, samples, evaluation and checkpoints at their intervals."""
        cfg = self.cfg
        if (step + 1) % cfg.log_interval == 0 or "skipped" in record:
            self.logger.log(rollout, record)
        done = self.learner.counters.step
        if done == step:  # the training step goes on
            return
        signal = "reward_global" if cfg.train_global else "reward_local"
        totals = record.get(f"{signal}/total/branches")
        mean = None if totals is None else float(totals.mean())
        gathered = [r for r in gather_objects(mean, self.info) if r is not None]
        branch = sum(gathered) / len(gathered) if gathered else None  # mean over ranks
        self.progress.update(done, reward=branch, loss=record.get("loss"))
        every = cfg.sample_interval_steps
        if every and done % every == 0 and self.main and "skipped" not in record:
            self.write_samples(done, record)
        if cfg.eval_interval_steps and done % cfg.eval_interval_steps == 0:
            scores = self.evaluate(f"step{done:05d}")
            means = {k: sum(v) / len(v) for k, v in scores.items()}
            means["total"] = sum(w * means[k] for k, w in cfg.eval_reward_weights.items())
            self.logger.log(rollout, {"eval": means})
        if cfg.save_interval_steps and done % cfg.save_interval_steps == 0:
            self.save()

    def write_samples(self, step: int, record: dict) -> None:
        """``samples/stepNNNNN.{gif,mp4}`` (the group's videos side by side, anchor last) and
        ``samples/stepNNNNN_branches.png`` (one labelled row per branch over the fork window)."""
        cfg, learner = self.cfg, self.learner
        videos, stem = learner.last_videos, self.run_dir / "samples" / f"step{step:05d}"
        write_video(side_by_side(videos, scale=4), stem, fps=8)
        total = "reward_local/total" if cfg.train_local else "reward_global/total"
        labels = branch_labels(
            record[f"{total}/branches"], record[f"{total}/anchor"], record["advantage/final"]
        )
        frame, start = learner.video_model.video_frame, record["routing/start_frame"]
        window = range(frame(start), frame(start + learner.geometry.window_frames))
        branch_grid(videos, labels, window).save(stem.with_name(stem.name + "_branches.png"))

    def save(self) -> None:
        """Checkpoint (rank 0 writes) and export the adapter in peft format."""
        state = save_state(self.learner, self.run_dir, capture_rng(), write=self.main)
        barrier(self.info)
        if self.main and state is not None:
            export_adapter(self.learner.model, self.run_dir / "adapter")

    def finish(self, before, after) -> dict | None:
        """Plots, the paired before/after table and ``summary.json`` (rank 0)."""
        cfg, counters = self.cfg, self.learner.counters
        self.logger.close()
        if not self.main:
            return None
        records = read_metrics(self.run_dir / "metrics.jsonl")
        if records:
            write_reward_curve(records, self.run_dir / "reward_curve.png")
            write_training_curves(records, self.run_dir / "training_curves.png")
        summary = {
            "steps": counters.step,
            "rollouts": counters.rollouts,
            "skipped": counters.skipped,
        }
        if before is not None and after is not None:
            stats = paired_summary(before, after, cfg.eval_reward_weights)
            summary["heldout"] = [s.to_dict() for s in stats]
            print(format_summary(stats, f"held-out rewards, {cfg.eval_prompts} prompts"))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"run directory: {self.run_dir}")
        return summary
