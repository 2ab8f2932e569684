"""One KVPO training step, from routing plan to LoRA update (method.md sections 2-4).

Per step and rank (one prompt group per rank):

1. **plan**: the CHR routing plan of the group, seeded by ``(seed, step, rank)``;
2. **rollout** with the old policy (adapter ``"old"``): shared prefix, fork, G routed branches
   and the anchor (:mod:`kvpo.rollout`);
3. **rewards**: local (the forked chunk) and global (one clip per segment) for every row;
   **advantages** anchor-relative per component, fused and clipped (:mod:`kvpo.advantages`);
4. **replay** of the branches under the unrouted context with the old, the reference (adapters
   disabled) and the current policy (:mod:`kvpo.replay`) -> energies -> logits ``-E / tau``;
5. **update**: the objective (:func:`kvpo.policy.policy_loss`), gradients averaged over ranks,
   grad-norm clip, AdamW + warmup, EMA; the old policy is re-synced every ``sync_every``
   rollouts, and the ratio of the first update after each sync is logged (it must be 1).

With ``row_micro_batch`` smaller than G the current policy's replay runs in two passes: energies
without grad for the whole group, ``dL/dE`` on them, then each micro-batch again with grad,
back-propagating its share (the same gradient with one micro-batch of activations alive).
A step whose rewards or loss are not finite is skipped on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kvpo import policy
from kvpo.advantages import any_branch_beats_anchor, group_advantages
from kvpo.config import TrainConfig
from kvpo.config_checks import routing_geometry, video_chunks
from kvpo.distributed import DistInfo, any_rank, average_gradients, broadcast_parameters
from kvpo.generator import Generator
from kvpo.metrics import PhaseTimer
from kvpo.models import CachePolicy, FewStepSampler, FlowSchedule, FrameCache
from kvpo.models.lora import (
    active_adapter,
    adapters_disabled,
    add_lora,
    freeze_copy,
    import_lora,
    lora_parameters,
)
from kvpo.optim import EMA, build_optimizer, grad_norm
from kvpo.replay import replay_energies, step_weights
from kvpo.rewards import build_reward
from kvpo.rollout import GroupNoise, GroupRollout, noise_seed, rollout_group
from kvpo.routing import plan_routing
from kvpo.scoring import VideoLayout, clip_for, global_clips, score_clips

PHASES = ("rollout", "rewards", "replay_old", "replay_ref", "replay_grad", "update")


@torch.no_grad()
def merge_lora_into_base(model, source, alpha: float | None = None) -> None:
    """Add an external LoRA (:func:`kvpo.models.lora.import_lora` formats) to the base weights,
    ``W += scale * B @ A``, and drop it: the reference policy (adapters disabled) is then the
    starting model, as in LongLive / MemFlow KVPO where the LoRA is part of the generator.
    ``alpha``: the LoRA's alpha (None: its rank)."""
    import_lora(model, source, alpha=alpha, adapter="imported")
    for module in model.transformer.modules():
        if "imported" in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            base.weight += module.get_delta_weight("imported").to(base.weight.dtype)
    model.transformer.delete_adapters("imported")


class SkippedStep(RuntimeError):
    """A step whose rewards or loss were not finite (skipped on every rank)."""


@dataclass
class Counters:
    """Progress that a checkpoint must carry to resume exactly."""

    step: int = 0
    since_sync: int = 0
    consecutive_skips: int = 0
    skipped: int = 0
    history: list = field(default_factory=list)  # [step, mean branch reward, anchor reward]


class KVPOTrainer:
    """Holds the generator, its adapters, the optimizer and the paged cache of one rank."""

    def __init__(self, cfg: TrainConfig, gen: Generator, info: DistInfo):
        self.cfg, self.gen, self.info = cfg, gen, info
        self.model = gen.wan
        self.device = info.device
        mk = cfg.model_kwargs
        self.policy = CachePolicy(
            mk.sink_size, mk.local_attn_size, cfg.resident_frames, cfg.num_frame_per_block
        )
        self.schedule = FlowSchedule(
            tuple(cfg.denoising_step_list), mk.timestep_shift, warp=cfg.warp_denoising_step
        )
        self.sampler = FewStepSampler(self.schedule, rule=cfg.sampler_rule)
        self.weights = step_weights(self.schedule, cfg.tve_step_weight).to(self.device)
        self.geometry = routing_geometry(cfg)
        self.chunks = video_chunks(cfg)
        self.layout = VideoLayout(cfg.streaming_max_length, tuple(cfg.switch_frames))
        self.video_layout = self.layout.mapped(gen.video_frame)  # frames of decoded videos
        self.reward = build_reward(cfg.reward_model)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing  # grad-carrying replays
        self._setup_adapters()
        self.cache = FrameCache.create(
            self.model.config,
            self.policy,
            self._num_pages(),
            dtype=self.model.dtype,
            device=self.device,
            backend=None if cfg.kernel_backend == "auto" else cfg.kernel_backend,
        )
        self.counters = Counters()
        self.last_videos: torch.Tensor | None = None  # [G + 1, T, 3, H, W] of the last rollout

    # ------------------------------------------------------------------ setup
    def _setup_adapters(self) -> None:
        cfg = self.cfg
        if cfg.lora_ckpt is not None:  # a starting LoRA becomes part of the frozen base
            merge_lora_into_base(self.model, cfg.lora_ckpt, cfg.lora_ckpt_alpha)
        targets = cfg.adapter.target_modules or None
        kwargs = {"targets": targets} if targets else {}
        add_lora(
            self.model, cfg.adapter.rank, cfg.adapter.alpha, dropout=cfg.adapter.dropout, **kwargs
        )
        self.named_params = lora_parameters(self.model, "default")
        self.params = list(self.named_params.values())
        broadcast_parameters(self.params, self.info)
        freeze_copy(self.model, "default", "old")
        betas = (cfg.beta1, cfg.beta2)
        self.optimizer, self.scheduler = build_optimizer(
            self.params, cfg.lr, betas, cfg.weight_decay, cfg.lr_scheduler,
            cfg.lr_warmup_steps, cfg.max_train_steps,
        )  # fmt: skip
        self.ema = EMA(self.named_params, cfg.ema_decay) if cfg.ema_decay > 0 else None

    @property
    def rows_per_batch(self) -> int:
        """Cache rows alive at once: ``row_micro_batch`` (rollout, replays, evaluation) or G + 1."""
        return min(self.cfg.row_micro_batch or self.cfg.K + 1, self.cfg.K + 1)

    def _num_pages(self) -> int:
        """Pages for the largest phase: the fork snapshot plus one micro-batch of rows, each
        holding its resident frames and a prompt-switch recache segment (pinned replay views
        share pages)."""
        cfg = self.cfg
        per_row = cfg.resident_frames + cfg.model_kwargs.local_attn_size + cfg.num_frame_per_block
        return per_row * (self.rows_per_batch + 1)

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

    # ------------------------------------------------------------------ one step
    def rollout(self, step: int, prompts: list[str], rank: int) -> GroupRollout:
        cfg, G = self.cfg, self.cfg.K
        plan = plan_routing(
            self.geometry, self.chunks, G, seed=cfg.seed, step=step, rank=rank,
            within_first_x_chunks=cfg.perturb_within_first_x_chunks, mode=cfg.routing_mode,
        )  # fmt: skip
        C, H, W = self.gen.latent_shape
        noise = GroupNoise.draw(
            noise_seed(cfg.seed, step, rank), (C, cfg.streaming_max_length, H, W),
            self.schedule.num_steps, self.device, self.model.dtype,
        )  # fmt: skip
        policy_frames = cfg.policy_window_frames or plan.geometry.window_frames
        chunk = self.chunks[plan.chunk_index]
        end = cfg.streaming_max_length if cfg.train_global else max(chunk.end_frame, plan.end_frame)
        with torch.no_grad(), active_adapter(self.model, "old"):
            texts = [self.gen.encode([p]) for p in prompts]
            return rollout_group(
                self.model, self.cache, texts, cfg.switch_frames, plan, noise,
                sampler=self.sampler, policy_frames=policy_frames, end_frame=end,
                row_batch=cfg.row_micro_batch, context_timestep=float(cfg.context_noise),
            )  # fmt: skip

    def rewards(self, ro: GroupRollout, prompts: list[str]):
        """``(local, global)``: each ``(branch rewards {name: [G]}, anchor {name: scalar})``."""
        cfg, G = self.cfg, self.cfg.K
        videos = self.gen.decode(ro.latents)
        chunk = self.chunks[ro.plan.chunk_index]
        out = []
        frame, layout = self.gen.video_frame, self.video_layout
        local = clip_for(layout, prompts, frame(chunk.start_frame), frame(chunk.end_frame))
        for use, clips in (
            (cfg.train_local, [local]),
            (cfg.train_global, global_clips(layout, prompts, cfg.long_reward_normal_clip_len)),
        ):
            if not use:
                out.append(None)
                continue
            scores = score_clips(self.reward, videos, [clips] * (G + 1))
            out.append(
                ({k: v[:G] for k, v in scores.items()}, {k: v[G] for k, v in scores.items()})
            )
        return out[0], out[1], videos

    def energies(self, ro, prompts, branches, adapter: str | None) -> torch.Tensor:
        """Replay energies ``[len(branches)]`` under ``adapter`` (None: adapters disabled), in
        micro-batches of :attr:`rows_per_batch` branches (one batch when grad is enabled)."""
        cfg = self.cfg
        scope = active_adapter(self.model, adapter) if adapter else adapters_disabled(self.model)
        step = len(branches) if torch.is_grad_enabled() else self.rows_per_batch
        with scope:
            texts = [self.gen.encode([p]) for p in prompts]
            return torch.cat(
                [
                    replay_energies(
                        self.model, self.cache, ro, texts, cfg.switch_frames, self.schedule,
                        self.weights, branches=branches[i : i + step],
                        grad_steps=cfg.log_prob_grad_steps,
                        context_timestep=float(cfg.context_noise),
                    )
                    for i in range(0, len(branches), step)
                ]
            )  # fmt: skip

    def objective(self, energy, energy_old, energy_ref, adv, safe) -> policy.PolicyLoss:
        cfg = self.cfg
        config = policy.PolicyConfig(
            tau=cfg.tau, clip_low=cfg.clip_range_low, clip_high=cfg.clip_range_high,
            log_ratio_clamp=cfg.log_ratio_clamp, kl_coef=cfg.kl_coef,
        )  # fmt: skip
        return policy.policy_loss(
            energy, energy_old, energy_ref, adv, beats_anchor=safe, config=config
        )

    def train_step(self, step: int, timer: PhaseTimer | None = None) -> dict:
        """Run step ``step`` on this rank's group; returns its metrics.

        Raises :class:`SkippedStep` (on every rank alike) when a reward or the loss is not finite.
        """
        timer = timer or PhaseTimer(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        record = self.group_gradients(step, timer)
        record.update(self.apply_update(timer))
        return record

    def group_gradients(self, step: int, timer: PhaseTimer, rank: int | None = None) -> dict:
        """Rollout, rewards, advantages, replays and ``backward`` of one group: the gradient of
        its loss is *added* to the adapter's ``.grad`` (``rank`` overrides the rank whose seeds
        pick the prompts, plan and noise)."""
        cfg = self.cfg
        rank = self.info.rank if rank is None else rank
        prompts = self.gen.train_prompts(step, rank)
        with timer("rollout"):
            ro = self.rollout(step, prompts, rank)
        try:
            with timer("rewards"):
                local, global_, self.last_videos = self.rewards(ro, prompts)
            raw = [t for sig in (local, global_) if sig for part in sig for t in part.values()]
            if any_rank(not all(bool(torch.isfinite(t).all()) for t in raw), self.info):
                raise SkippedStep("non-finite reward")
            adv = group_advantages(
                local, global_, cfg.reward_weights, mode=cfg.advantage_mode,
                fusion_mode=cfg.advantage_fusion_mode,
                local_weight=cfg.advantage_fusion_local_weight,
                global_weight=cfg.advantage_fusion_global_weight, clip=cfg.adv_clip_max,
            )  # fmt: skip
            safe = any_branch_beats_anchor([local, global_], cfg.reward_weights)
            record = self._backward(ro, prompts, adv.final.to(self.device), safe, timer)
        finally:
            self.cache.free([ro.snapshot])
        record.update(self._reward_metrics(local, global_, adv, ro))
        return record

    def _backward(self, ro, prompts, adv, safe, timer) -> dict:
        cfg, G, branches = self.cfg, self.cfg.K, list(range(self.cfg.K))
        with timer("replay_old"), torch.no_grad():
            e_old = self.energies(ro, prompts, branches, "old")
        with timer("replay_ref"), torch.no_grad():
            use_ref = cfg.kl_coef > 0 and cfg.kl_reference_initial
            e_ref = self.energies(ro, prompts, branches, None) if use_ref else e_old
        chunk = min(cfg.row_micro_batch or G, G)
        with timer("replay_grad"):
            if chunk >= G:
                e_cur = self.energies(ro, prompts, branches, "default")
                out = self.objective(e_cur, e_old, e_ref, adv, safe)
                skip = any_rank(not bool(torch.isfinite(out.loss)), self.info)
                if not skip:
                    out.loss.backward()
            else:  # two passes: dL/dE once, then each micro-batch's share with grad
                with torch.no_grad():
                    e_cur = self.energies(ro, prompts, branches, "default").requires_grad_()
                out = self.objective(e_cur, e_old, e_ref, adv, safe)
                skip = any_rank(not bool(torch.isfinite(out.loss)), self.info)
                if not skip:
                    out.loss.backward()
                    for i in range(0, G, chunk):
                        part = self.energies(ro, prompts, branches[i : i + chunk], "default")
                        (part * e_cur.grad[i : i + chunk]).sum().backward()
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            raise SkippedStep(f"non-finite loss {float(out.loss.detach())}")
        log_ratio = policy.branch_log_probs(e_cur.detach(), cfg.tau) - policy.branch_log_probs(
            e_old, cfg.tau
        )
        first = self.counters.since_sync == 0
        return {
            "loss": float(out.loss.detach()),
            "energy/current": e_cur.detach(),
            "energy/old": e_old,
            "energy/ref": e_ref,
            "sync/first_update_after_sync": first,
            "sync/max_abs_log_ratio": float(log_ratio.abs().max()),
            **({"sync/ratio_exactly_one": bool((log_ratio == 0).all())} if first else {}),
            "policy/ratio": out.ratio,
            **{f"policy/{k}": v for k, v in out.diagnostics.items()},
        }

    def apply_update(self, timer: PhaseTimer) -> dict:
        """Average the gradients over ranks, clip, step AdamW and the LR schedule, update the
        EMA, and re-sync the old policy every ``sync_every`` updates."""
        cfg = self.cfg
        with timer("update"):
            average_gradients(self.params, self.info)
            norm = grad_norm(self.params)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.named_params)
            self.counters.since_sync += 1
            if self.counters.since_sync >= cfg.sync_every:
                freeze_copy(self.model, "default", "old")
                self.counters.since_sync = 0
        return {"grad_norm": norm, "lr": lr}

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
            record[f"reward_{name}/total_mean"] = float(total.mean())
            record[f"reward_{name}/total_anchor"] = anchor
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
