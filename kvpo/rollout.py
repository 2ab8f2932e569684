"""Group rollout (method.md section 2): one shared prefix, G routed branches and the anchor.

With the old policy's weights and no gradient:

1. The prefix ``[0, fork)`` is generated once, in one cache row (prompt switches and recache
   included); that row stays alive as the *fork snapshot* the replay starts from.
2. ``G + 1`` rows fork from it: page-table forks, no K/V copied. Rows ``0..G-1`` are branches,
   row ``G`` the unrouted anchor.
3. All rows continue with the **same** initial noise and re-noising noise, so they differ only by
   routing: inside the routed window ``[fork, fork + P * F)`` branch ``g`` attends to
   ``plan.context_frames(g, block)`` (denoising steps and context pass alike); the anchor, and
   every row after the window, attends to the default sink + window view. The blocks of the
   policy window (the routed window unless configured longer) are recorded: ``z[g, b, s]`` and
   the old policy's velocity ``u[g, b, s]`` (= ``(z - x0_hat) / sigma_s``).
4. After the window the rows continue unrouted to ``end_frame`` with the remaining switches.

Rows run in micro-batches of ``row_batch`` (all at once by default); each micro-batch runs from
the fork to the end and then frees its rows, so private pages never outlive their branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvpo.distributed import rank_seed
from kvpo.models import FewStepSampler, FrameCache, TextContext, generate, recache
from kvpo.routing import RoutingPlan


@dataclass
class GroupNoise:
    """The noise every row of a group shares: ``noise [1, C, T, H, W]``, ``renoise
    [S - 1, 1, C, T, H, W]`` (drawn on the CPU from one seed, then moved: device-independent)."""

    noise: torch.Tensor
    renoise: torch.Tensor

    @classmethod
    def draw(cls, seed: int, shape: Sequence[int], steps: int, device, dtype) -> GroupNoise:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, *shape, generator=gen)
        renoise = torch.randn(max(steps - 1, 0), 1, *shape, generator=gen)
        return cls(noise.to(device, dtype), renoise.to(device, dtype))

    def frames(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.noise[:, :, lo:hi], self.renoise[:, :, :, lo:hi]


def noise_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the group noise at training step ``step`` on ``rank``."""
    return rank_seed(seed, rank, stream=1_000_000 + step)


@dataclass
class GroupRollout:
    """What the rollout hands to rewards and replay.

    ``latents [G + 1, C, end, H, W]``: every row's video (row ``G`` = anchor).
    ``z, u [G, K, C, F, H, W]``: recorded inputs and old-policy velocities of the policy blocks,
    ``k = block * S + step``. ``snapshot``: the cache row holding frames ``< fork`` (free it
    after the replay). ``kv_bytes``: K/V bytes held after each phase.
    """

    plan: RoutingPlan
    latents: torch.Tensor
    policy_starts: list[int]
    z: torch.Tensor
    u: torch.Tensor
    snapshot: int
    kv_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def fork(self) -> int:
        return self.plan.start_frame

    @property
    def prefix(self) -> torch.Tensor:
        """``[1, C, fork, H, W]`` the shared prefix."""
        return self.latents[:1, :, : self.fork]


def switch_texts(
    texts: Sequence[TextContext], switches: Sequence[int], lo: int, hi: int, include_lo: bool
) -> dict[int, TextContext]:
    """``{frame: text}`` of the prompt switches in ``(lo, hi)`` (``[lo, hi)`` with
    ``include_lo``); segment ``k + 1`` starts at ``switches[k]``."""
    return {
        f: texts[min(k + 1, len(texts) - 1)]
        for k, f in enumerate(switches)
        if (lo < f or (include_lo and f == lo)) and f < hi
    }


def segment_text(texts: Sequence[TextContext], switches: Sequence[int], frame: int):
    """The prompt in force at ``frame``."""
    return texts[min(sum(1 for s in switches if s <= frame), len(texts) - 1)]


@torch.no_grad()
def rollout_group(
    model,
    cache: FrameCache,
    texts: Sequence[TextContext],
    switches: Sequence[int],
    plan: RoutingPlan,
    noise: GroupNoise,
    *,
    sampler: FewStepSampler,
    policy_frames: int,
    end_frame: int,
    row_batch: int = 0,
    context_timestep: float = 0.0,
) -> GroupRollout:
    """Roll out one group (see the module docstring).

    Args:
        model: the causal model, holding the old policy's weights.
        texts: one single-prompt :class:`TextContext` per prompt segment.
        switches: frames where segments ``1, 2, ...`` start.
        plan: the group's routing plan (``G = len(plan.routed)`` branches).
        noise: the group's shared noise, covering at least ``end_frame`` frames.
        policy_frames: frames from the fork whose trajectories are recorded (>= the window).
        end_frame: generate up to this frame (the end of the video for the global reward).
        row_batch: rows per micro-batch (0: all ``G + 1``).
    """
    G, fork, F = len(plan.routed), plan.start_frame, cache.policy.frames_per_block
    record_end = min(end_frame, fork + max(policy_frames, plan.end_frame - fork))
    kv_bytes = {}
    (snapshot,) = cache.new_rows(1)
    text0 = texts[0]
    prefix_noise, prefix_renoise = noise.frames(0, fork)
    prefix = generate(
        model,
        cache,
        [snapshot],
        text0,
        prefix_noise,
        sampler=sampler,
        renoise=prefix_renoise,
        switches=switch_texts(texts, switches, 0, fork, include_lo=False),
        context_timestep=context_timestep,
    ).latents
    text_fork = segment_text(texts, switches, fork)
    if fork in switches:  # the switch's recache is shared by the whole group: do it once
        recache(model, cache, [snapshot], prefix, text_fork, fork, context_timestep)
    kv_bytes["prefix"] = cache.held_bytes
    rows_all = list(range(G + 1))
    step = row_batch or (G + 1)
    videos, zs, us = [], [], []
    for r0 in range(0, G + 1, step):
        idx = rows_all[r0 : r0 + step]
        rows = cache.fork(snapshot, len(idx))

        def plans(frame, idx=idx):
            if not plan.in_window(frame):
                return None
            return [
                plan.context_frames(g, frame) if g < G else cache.policy.window(frame, F)
                for g in idx
            ]

        win_noise, win_renoise = noise.frames(fork, record_end)
        window = generate(
            model,
            cache,
            rows,
            text_fork,
            win_noise,
            sampler=sampler,
            renoise=win_renoise,
            start_frame=fork,
            switches=switch_texts(texts, switches, fork, record_end, include_lo=False),
            history=prefix,
            plans=plans,
            record=True,
            context_timestep=context_timestep,
        )
        kv_bytes["window"] = max(kv_bytes.get("window", 0), cache.held_bytes)
        parts = [prefix.expand(len(idx), *prefix.shape[1:]), window.latents]
        if end_frame > record_end:
            rest_noise, rest_renoise = noise.frames(record_end, end_frame)
            rest = generate(
                model,
                cache,
                rows,
                segment_text(texts, switches, record_end),
                rest_noise,
                sampler=sampler,
                renoise=rest_renoise,
                start_frame=record_end,
                switches=switch_texts(texts, switches, record_end, end_frame, include_lo=True),
                history=torch.cat(parts, dim=2),
                context_timestep=context_timestep,
            )
            parts.append(rest.latents)
        kv_bytes["continuation"] = max(kv_bytes.get("continuation", 0), cache.held_bytes)
        cache.free(rows)
        videos.append(torch.cat(parts, dim=2))
        keep = [i for i, g in enumerate(idx) if g < G]
        zs.append(torch.stack([t.z[:, keep] for t in window.trajectories], dim=2))
        us.append(torch.stack([t.v[:, keep] for t in window.trajectories], dim=2))
    # [S, G, blocks, ...] -> [G, blocks * S, ...] with k = block * S + step
    z = torch.cat(zs, dim=1).permute(1, 2, 0, *range(3, zs[0].dim())).flatten(1, 2)
    u = torch.cat(us, dim=1).permute(1, 2, 0, *range(3, us[0].dim())).flatten(1, 2)
    return GroupRollout(
        plan=plan,
        latents=torch.cat(videos),
        policy_starts=list(range(fork, record_end, F)),
        z=z,
        u=u,
        snapshot=snapshot,
        kv_bytes=kv_bytes,
    )
