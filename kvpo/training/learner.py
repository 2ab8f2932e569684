"""One KVPO step of one rank, from routing plan to LoRA update (docs/method.md sections 2-4).

:class:`Learner` holds the policy adapters, the optimizer, the EMA and the streaming generator.
Per step (one prompt group per rank):

1. **plan**: the CHR routing plan of the group, seeded by ``(seed, step, rank)``;
2. **rollout** with the old policy (adapter ``"old"``): shared prefix, fork, G routed branches
   and the anchor (:mod:`kvpo.method.rollout`; ``exploration``: routed and/or noise-perturbed
   branches, :mod:`kvpo.method.exploration`);
3. **rewards**: local (the forked chunk) and global (kvpo.rewards.clips.GlobalReward) per row;
   **advantages** anchor-relative per component, fused and clipped
   (:mod:`kvpo.method.advantages`);
4. **replay** of the branches under the unrouted context with the old and the reference policy
   (:mod:`kvpo.training.adapters`), once per rollout (:mod:`kvpo.method.replay`); with
   ``kl_loss_mode: try_kl`` the reference's replay of the anchor (:mod:`kvpo.method.anchor_kl`);
5. ``ppo_epochs`` times: the current policy's replay with grad, the objective
   (:func:`kvpo.method.policy.policy_loss`) against the fixed old and reference energies,
   gradients averaged over ranks, grad-norm clip, AdamW, EMA (unless kvpo.training.gates skips);
6. every ``sync_every`` rollouts (one *training step*) the old policy is re-synced and the
   learning-rate schedule advances; the ratio of the first update after each sync is logged
   (it must be exactly 1).

With ``row_micro_batch`` smaller than G the current policy's replay runs in two passes: energies
without grad for the whole group, ``dL/dE`` on them, then each micro-batch again with grad,
back-propagating its share (the same gradient with one micro-batch of activations alive).
A step whose rewards or loss are not finite is skipped on every rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvpo.method import policy
from kvpo.method.advantages import any_branch_beats_anchor, group_advantages
from kvpo.method.anchor_kl import AnchorKL, AnchorReference
from kvpo.method.exploration import branch_noise
from kvpo.method.replay import replay_energies
from kvpo.method.rollout import GroupRollout, rollout_group
from kvpo.method.routing import RoutingPlan
from kvpo.method.routing_memflow import plan_for_rule
from kvpo.models.lora import active_adapter, adapter_scope, freeze_copy
from kvpo.rewards.clips import local_reward_input, score_clips, split_anchor
from kvpo.streaming import branch_seed, group_seed, stream_from_config
from kvpo.training.adapters import setup_adapters
from kvpo.training.config import TrainConfig
from kvpo.training.counters import Counters
from kvpo.training.distributed import DistInfo, any_rank, average_gradients
from kvpo.training.gates import skip_update
from kvpo.training.optim import EMA, build_optimizer, grad_norm
from kvpo.training.phases import PhaseTimer
from kvpo.training.prompts import PromptSource
from kvpo.video_model import VideoModel

PHASES = ("rollout", "rewards", "replay_old", "replay_ref", "replay_grad", "update")


class SkippedStep(RuntimeError):
    """A step whose rewards or loss were not finite (skipped on every rank)."""


@dataclass
class GroupData:
    """What the policy epochs of one rollout share: the rollout, its prompts, the advantages
    ``[G]``, whether a branch beats the anchor, and the fixed old / reference energies ``[G]``."""

    rollout: GroupRollout
    prompts: list[str]
    advantages: torch.Tensor
    beats_anchor: bool
    energy_old: torch.Tensor
    energy_ref: torch.Tensor
    record: dict
    anchor: AnchorReference | None = None  # try_kl: the reference's replay of the anchor


class Learner:
    """The policy of one rank: adapters, optimizer, EMA, and the generator they run in.

    Args:
        cfg: the run's configuration.
        model: the video model (base weights frozen; LoRA adapters are added here).
        info: this process's rank and device.
        reward: a reward model (see :mod:`kvpo.rewards`).
        prompts: where each group's prompts come from.
    """

    def __init__(
        self, cfg: TrainConfig, model: VideoModel, info: DistInfo, *, reward, prompts: PromptSource
    ):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.video_model, self.model = model, model.wan
        self.reward, self.prompts = reward, prompts
        self.geometry, self.chunks = cfg.routing_geometry(), cfg.chunks()
        self.policy_config, self.advantage_config = cfg.policy_config(), cfg.advantage_config()
        self.exploration = cfg.exploration_config()  # how branches differ (mutable: kvpo study)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing  # grad-carrying replays
        self._setup_adapters()
        self.stream = stream_from_config(model, cfg, self.rows_per_batch)
        self.weights = cfg.step_weights().to(self.device)
        self.video_layout = self.stream.layout.mapped(model.video_frame)  # decoded frames
        self.counters = Counters()
        self.anchor_kl = AnchorKL.from_config(cfg, self.stream, self.kl_reference)  # try_kl
        self.last_latents: torch.Tensor | None = None  # [G + 1, C, T, H, W] of the last rollout

    # ------------------------------------------------------------------ setup
    def _setup_adapters(self) -> None:
        cfg = self.cfg
        adapters = setup_adapters(self.model, cfg, self.info)  # lora_ckpt, lora_init, adapter.*
        self.named_params, self.kl_reference = adapters.params, adapters.kl_reference
        self.params = list(self.named_params.values())
        # the schedule counts training steps (one scheduler step each, in end_rollout)
        self.optimizer, self.scheduler = build_optimizer(
            self.params, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.lr_scheduler,
            cfg.lr_warmup_steps, cfg.max_train_steps,
        )  # fmt: skip
        self.ema = EMA(self.named_params, cfg.ema_decay) if cfg.ema_decay > 0 else None

    @property
    def last_videos(self) -> torch.Tensor | None:
        """``[G + 1, T, 3, H, W]`` in [0, 1] on the CPU: the last rollout's videos, decoded again
        when asked for (the step's own decoded videos are freed after scoring)."""
        if self.last_latents is None:
            return None
        with torch.no_grad():
            return self.video_model.decode(self.last_latents).cpu()

    @property
    def cache(self):
        return self.stream.cache

    @property
    def rows_per_batch(self) -> int:
        return self.cfg.rows_per_batch

    @contextmanager
    def ema_weights(self, enabled: bool = True) -> Iterator[None]:
        """Run with the EMA weights in the policy adapter (restored on exit)."""
        if not enabled or self.ema is None:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.named_params.items()}
        self.ema.copy_to(self.named_params)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.named_params.items():
                    p.copy_(saved[k])

    # ------------------------------------------------------------------ pieces of a step
    def plan(self, step: int, rank: int) -> RoutingPlan:
        """The group's routing plan (its start block is the fork frame in every exploration
        mode; the routed sets are used when :attr:`exploration` routes)."""
        cfg = self.cfg
        return plan_for_rule(
            cfg.routing_rule, self.geometry, self.chunks, cfg.K, seed=cfg.seed, step=step,
            rank=rank, within_first_x_chunks=cfg.perturb_within_first_x_chunks,
            mode=cfg.routing_mode,
        )  # fmt: skip

    def rollout(self, step: int, prompts: list[str], rank: int) -> GroupRollout:
        cfg, G = self.cfg, self.cfg.K
        plan = self.plan(step, rank)
        seed = group_seed(cfg.seed, step, rank)
        noise = self.stream.noise(seed)
        policy_frames = cfg.policy_frames(plan)
        chunk = self.chunks[plan.chunk_index]
        end = cfg.streaming_max_length if cfg.train_global else max(chunk.end_frame, plan.end_frame)
        seeds = [branch_seed(seed, g) for g in range(G)]
        fork = plan.start_frame
        perturb = branch_noise(self.exploration, noise.noise, seeds, fork, chunk.end_frame)
        with torch.no_grad(), active_adapter(self.model, "old"):
            texts = self.stream.segment_texts(prompts)
            return rollout_group(
                self.stream, texts, plan, noise, policy_frames=policy_frames, end_frame=end,
                row_batch=cfg.row_micro_batch, routed=self.exploration.routes, perturb=perturb,
            )  # fmt: skip

    def rewards(self, ro: GroupRollout, prompts: list[str]):
        """``(local, global, videos)``: each signal ``(branch rewards {name: [G]}, anchor
        {name: scalar})`` or None when not trained on."""
        cfg, G, per_call = self.cfg, self.cfg.K, self.cfg.reward_videos_per_call
        videos, chunk = self.video_model.decode(ro.latents), self.chunks[ro.plan.chunk_index]
        span = (self.stream.layout, prompts, chunk.start_frame, chunk.end_frame)

        def local():
            clip_videos, clips = local_reward_input(
                cfg.local_reward_decode, self.video_model, ro.latents, videos, *span)  # fmt: skip
            return score_clips(self.reward, clip_videos, [clips] * (G + 1), per_call)

        def global_():  # segment (and transition) clips of all G + 1 videos
            layout, rows = self.video_layout, [prompts] * (G + 1)
            return cfg.global_reward().score(self.reward, videos, layout, rows, per_call)

        local_signal = split_anchor(local()) if cfg.train_local else None
        global_signal = split_anchor(global_()) if cfg.train_global else None
        return local_signal, global_signal, videos

    def energies(self, ro, prompts, branches, adapter: str | None) -> torch.Tensor:
        """Replay energies ``[len(branches)]`` under ``adapter`` (None: adapters disabled), in
        micro-batches of :attr:`rows_per_batch` branches (one batch when grad is enabled)."""
        cfg = self.cfg
        step = len(branches) if torch.is_grad_enabled() else self.rows_per_batch
        with adapter_scope(self.model, adapter):
            texts = self.stream.segment_texts(prompts)
            return torch.cat(
                [
                    replay_energies(
                        self.stream, ro, texts, self.weights, branches=branches[i : i + step],
                        grad_steps=cfg.log_prob_grad_steps,
                    )
                    for i in range(0, len(branches), step)
                ]
            )  # fmt: skip

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int, timer: PhaseTimer | None = None) -> dict:
        """Run step ``step`` on this rank's group (``ppo_epochs`` updates); returns its metrics.

        Raises :class:`SkippedStep` (on every rank alike) when a reward or the loss is not finite.
        """
        timer = timer or PhaseTimer(self.device)
        data = self.collect(step, timer)
        try:
            losses = []
            for epoch in range(self.cfg.ppo_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                update = self.policy_gradients(data, timer)
                update.update(self.apply_update(timer, update["update/skipped"]))
                losses.append(update["loss"])
                if epoch == 0:
                    record = {**data.record, **update}
            record["ppo/epoch_losses"] = losses
        finally:
            self.cache.free([data.rollout.snapshot])
        self.end_rollout()
        return record

    def group_gradients(self, step: int, timer: PhaseTimer, rank: int | None = None) -> dict:
        """One epoch's gradient of one group, *added* to the adapter's ``.grad`` (``rank``
        overrides the rank whose seeds pick the prompts, plan and noise)."""
        data = self.collect(step, timer, rank)
        try:
            return {**data.record, **self.policy_gradients(data, timer)}
        finally:
            self.cache.free([data.rollout.snapshot])

    def collect(self, step: int, timer: PhaseTimer, rank: int | None = None) -> GroupData:
        """Rollout, rewards, advantages and the old / reference energies of one group (free
        ``data.rollout.snapshot`` after the last epoch)."""
        cfg = self.cfg
        rank = self.info.rank if rank is None else rank
        prompts = self.prompts.train(step, rank)
        with timer("rollout"):
            ro = self.rollout(step, prompts, rank)
        try:
            with timer("rewards"):
                local, global_, _ = self.rewards(ro, prompts)
                self.last_latents = ro.latents
            raw = [t for sig in (local, global_) if sig for part in sig for t in part.values()]
            if any_rank(not all(bool(torch.isfinite(t).all()) for t in raw), self.info):
                raise SkippedStep(getattr(self.reward, "failure", None) or "non-finite reward")
            adv = group_advantages(local, global_, cfg.reward_weights, self.advantage_config)
            safe = any_branch_beats_anchor([local, global_], cfg.reward_weights)
            branches = list(range(cfg.K))
            with timer("replay_old"), torch.no_grad():
                e_old = self.energies(ro, prompts, branches, "old")
            with timer("replay_ref"), torch.no_grad():
                ref = self.kl_reference if self.policy_config.kl_coef > 0 else "old"
                e_ref = e_old if ref == "old" else self.energies(ro, prompts, branches, ref)
                anchor = self.anchor_kl and self.anchor_kl.reference(ro, prompts, step, rank)
        except BaseException:
            self.cache.free([ro.snapshot])
            raise
        record = self._reward_metrics(local, global_, adv, ro)
        return GroupData(ro, prompts, adv.final.to(self.device), safe, e_old, e_ref, record, anchor)

    def objective(self, energy, data: GroupData) -> policy.PolicyLoss:
        return policy.policy_loss(
            energy, data.energy_old, data.energy_ref, data.advantages,
            beats_anchor=data.beats_anchor, config=self.policy_config,
        )  # fmt: skip

    def policy_gradients(self, data: GroupData, timer: PhaseTimer) -> dict:
        """Replay the current policy with grad and back-propagate the objective into ``.grad``."""
        cfg, G, branches = self.cfg, self.cfg.K, list(range(self.cfg.K))
        ro, prompts = data.rollout, data.prompts
        chunk = min(cfg.row_micro_batch or G, G)
        with timer("replay_grad"):
            if chunk >= G:
                e_cur = self.energies(ro, prompts, branches, "default")
                out = self.objective(e_cur, data)
                skip = any_rank(not bool(torch.isfinite(out.loss)), self.info)
                if not skip:
                    out.loss.backward()
            else:  # two passes: dL/dE once, then each micro-batch's share with grad
                with torch.no_grad():
                    e_cur = self.energies(ro, prompts, branches, "default").requires_grad_()
                out = self.objective(e_cur, data)
                skip = any_rank(not bool(torch.isfinite(out.loss)), self.info)
                if not skip:
                    out.loss.backward()
                    for i in range(0, G, chunk):
                        part = self.energies(ro, prompts, branches[i : i + chunk], "default")
                        (part * e_cur.grad[i : i + chunk]).sum().backward()
            if self.anchor_kl is not None and not skip:  # try_kl, after the replay's backward
                term, mse = self.anchor_kl.penalty(ro, prompts, data.anchor, data.beats_anchor)
                skip = any_rank(not bool(torch.isfinite(term)), self.info)
                if not skip:
                    term.backward()
                loss = out.diagnostics["loss"] + term.item()
                out.diagnostics.update(anchor_mse=float(mse), loss=loss)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            raise SkippedStep(f"non-finite loss {out.diagnostics['loss']}")
        log_ratio = policy.branch_log_probs(e_cur.detach(), cfg.tau) - policy.branch_log_probs(
            data.energy_old, cfg.tau
        )
        first = self.counters.since_sync == 0
        return {
            "loss": out.diagnostics["loss"],
            "energy/current": e_cur.detach(),
            "energy/old": data.energy_old,
            "energy/ref": data.energy_ref,
            "sync/first_update_after_sync": first,
            "sync/max_abs_log_ratio": float(log_ratio.abs().max()),
            **({"sync/ratio_exactly_one": bool((log_ratio == 0).all())} if first else {}),
            "policy/ratio": out.ratio,
            "update/skipped": skip_update(self.policy_config, e_cur, data.beats_anchor, self.info),
            **{f"policy/{k}": v for k, v in out.diagnostics.items()},
        }

    def apply_update(self, timer: PhaseTimer, skip: bool = False) -> dict:
        """Average the gradients over ranks, clip, then (unless ``skip``: kvpo.training.gates) step
        AdamW and the EMA; logs AdamW's ``lr`` (the schedule advances in :meth:`end_rollout`)."""
        cfg = self.cfg
        with timer("update"):
            average_gradients(self.params, self.info)
            norm = grad_norm(self.params)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            lr = self.optimizer.param_groups[0]["lr"]
            if not skip:
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.named_params)
        return {"grad_norm": norm, "lr": lr}

    def end_rollout(self) -> None:
        """Count a finished (or skipped) rollout; every ``sync_every`` rollouts end a training
        step: re-sync the old policy, advance the LR schedule, count the step (the KVPO
        authors' accumulation boundary; see :class:`Counters`)."""
        counters = self.counters
        counters.rollouts += 1
        counters.since_sync += 1
        if counters.since_sync >= self.cfg.sync_every:
            freeze_copy(self.model, "default", "old")
            with warnings.catch_warnings():  # a first step whose rollouts were all skipped
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
                self.scheduler.step()
            counters.step += 1
            counters.since_sync = 0

    def _reward_metrics(self, local, global_, adv, ro) -> dict:
        record = {}
        for name, sig in (("local", local), ("global", global_)):
            if sig is None:
                continue
            for comp, values in sig[0].items():
                record[f"reward_{name}/{comp}/branches"] = values
                record[f"reward_{name}/{comp}/anchor"] = float(sig[1][comp])
            total = sum(values * w for comp, w in self.cfg.reward_weights.items()
                        for values in [sig[0][comp]])  # fmt: skip
            anchor = sum(float(sig[1][c]) * w for c, w in self.cfg.reward_weights.items())
            record[f"reward_{name}/total/branches"] = total
            record[f"reward_{name}/total/anchor"] = anchor
        record["advantage/final"] = adv.final
        record["advantage/fused"] = adv.fused
        record["advantage/clip_fraction"] = adv.clip_fraction
        for name, value in (("local", adv.local), ("global", adv.global_)):
            if value is not None:
                record[f"advantage/{name}"] = value
        record["routing/start_frame"] = ro.plan.start_frame
        record["routing/distinct_sets"] = ro.plan.distinct_sets()
        record["routing/mean_jaccard"] = ro.plan.mean_pairwise_jaccard()
        record["routing/plan"] = ro.plan.routed
        record["kv_bytes"] = dict(ro.kv_bytes)
        return record
