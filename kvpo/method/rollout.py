"""Group rollout (docs/method.md section 2): one shared prefix, G routed branches and the anchor.

With the old policy's weights and no gradient:

1. The prefix ``[0, fork)`` is generated once, in one cache row (prompt switches and recache
   included); that row stays alive as the *fork snapshot* the replay starts from, trimmed to
   the frames any row can still read: the sink, the default window at the fork and the
   branches' routed frames (:func:`shared_frames`).
2. ``G + 1`` rows fork from it: page-table forks, no K/V copied. Rows ``0..G-1`` are branches,
   row ``G`` the unrouted anchor. They are *lean* rows (:mod:`kvpo.models.frame_cache`): each
   holds its routed frames and at most ``local_attn_size`` newest frames, so the group's K/V
   is bounded by the shared history plus ``(rows in flight) x local_attn_size`` frames.
3. All rows continue with the **same** initial noise and re-noising noise, so they differ only by
   routing: inside the routed window ``[fork, fork + P * F)`` branch ``g`` attends to
   ``plan.context_frames(g, block)`` (denoising steps and context pass alike); the anchor, and
   every row after the window, attends to the default sink + window view. The blocks of the
   policy window (``policy_frames`` from the fork: by default every block of the fork chunk from
   the fork on, :func:`kvpo.method.routing.energy_frames`) are recorded: ``z[g, b, s]`` and the
   old policy's velocity ``u[g, b, s]`` (= ``(z - x0_hat) / sigma_s``).
4. After the window the rows continue unrouted to ``end_frame`` with the remaining switches.

Rows run in micro-batches of ``row_batch`` (all at once by default); each micro-batch runs from
the fork to the end and then frees its rows, so private pages never outlive their branch.

Noise-based exploration (:mod:`kvpo.method.exploration`): with ``routed=False`` the branches
attend to the default view like the anchor, and ``perturb`` gives them their own initial noise
and/or noise injected before denoising steps in the fork chunk; the anchor stays unperturbed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvpo.method.exploration import BranchNoise
from kvpo.method.routing import RoutingPlan
from kvpo.models import TextContext
from kvpo.streaming import StreamingGenerator, VideoNoise


@dataclass
class GroupRollout:
    """What the rollout hands to rewards and replay.

    ``latents [G + 1, C, end, H, W]``: every row's video (row ``G`` = anchor).
    ``z, u [G, K, C, F, H, W]``: recorded inputs and old-policy velocities of the policy blocks,
    ``k = block * S + step``. ``snapshot``: the cache row holding frames ``< fork`` (free it
    after the replay). ``kv_bytes``: the most K/V bytes held during each phase (``prefix``,
    ``window``, ``continuation``; the store's exact page count). ``context_noise
    [1, C, T, H, W]``: the context passes' noise the group used (None: clean input), which the
    replays use too.
    """

    plan: RoutingPlan
    latents: torch.Tensor
    policy_starts: list[int]
    z: torch.Tensor
    u: torch.Tensor
    snapshot: int
    kv_bytes: dict[str, int] = field(default_factory=dict)
    context_noise: torch.Tensor | None = None

    @property
    def fork(self) -> int:
        return self.plan.start_frame

    @property
    def prefix(self) -> torch.Tensor:
        """``[1, C, fork, H, W]`` the shared prefix."""
        return self.latents[:1, :, : self.fork]


def shared_frames(stream: StreamingGenerator, plan: RoutingPlan, routed: bool) -> list[int]:
    """Frames before the fork that a row of the group can read: the sink and the default
    window at the fork (the anchor, the replays, every row after the window) and, when routed,
    each branch's routed frames."""
    policy, fork, F = stream.cache.policy, plan.start_frame, stream.frames_per_block
    frames = set(range(min(policy.sink_size, fork))) | set(policy.window(fork, F))
    if routed:
        for g in range(len(plan.routed)):
            for block in plan.block_starts:
                frames.update(f for f in plan.context_frames(g, block) if f < fork)
    return sorted(frames)


@torch.no_grad()
def rollout_group(
    stream: StreamingGenerator,
    texts: Sequence[TextContext],
    plan: RoutingPlan,
    noise: VideoNoise,
    *,
    policy_frames: int,
    end_frame: int,
    row_batch: int = 0,
    routed: bool = True,
    perturb: BranchNoise | None = None,
) -> GroupRollout:
    """Roll out one group (see the module docstring).

    Args:
        stream: the generator, holding the old policy's weights; its layout's switches apply.
        texts: one single-prompt :class:`TextContext` per prompt segment.
        plan: the group's routing plan (``G = len(plan.routed)`` branches).
        noise: the group's shared noise (one video), covering at least ``end_frame`` frames.
        policy_frames: frames from the fork whose trajectories are recorded (>= the window).
        end_frame: generate up to this frame (the end of the video for the global reward).
        row_batch: rows per micro-batch (0: all ``G + 1``).
        routed: branches attend to their routed contexts in the window (False: the default
            view, as the anchor).
        perturb: the branches' own noise (None: every row uses ``noise``).
    """
    cache = stream.cache
    G, fork, F = len(plan.routed), plan.start_frame, stream.frames_per_block
    record_end = min(end_frame, fork + max(policy_frames, plan.end_frame - fork))
    store, kv_bytes = cache.store, {}

    def record_peak(phase: str) -> None:
        kv_bytes[phase] = max(kv_bytes.get(phase, 0), store.peak_held_bytes)
        store.reset_peak()

    store.reset_peak()
    (snapshot,) = cache.new_rows(1)
    prefix = stream.generate([snapshot], texts, noise, 0, fork).latents
    if fork in stream.layout.switches:  # the switch's recache is shared by the group: once
        stream.recache([snapshot], prefix, stream.text_at(texts, fork), fork)
    record_peak("prefix")
    cache.retain(snapshot, shared_frames(stream, plan, routed))
    store.reset_peak()
    rows_all = list(range(G + 1))
    step = row_batch or (G + 1)
    videos, zs, us = [], [], []
    for r0 in range(0, G + 1, step):
        idx = rows_all[r0 : r0 + step]
        rows = cache.fork(snapshot, len(idx), lean=True)
        for row, g in zip(rows, idx):
            if routed and g < G:  # routed frames outlive a recache inside the window
                cache.protect(row, plan.routed[g], until=plan.end_frame)

        def plans(frame, idx=idx):
            if not routed or not plan.in_window(frame):
                return None
            return [
                plan.context_frames(g, frame) if g < G else None  # the anchor: default view
                for g in idx
            ]

        rows_noise, inject = noise, {}
        if perturb is not None:
            if perturb.initial is not None:
                rows_noise = VideoNoise(
                    perturb.row_noise(noise.noise, idx), noise.renoise, noise.context
                )
            inject = {"window": perturb.row_inject(idx, fork, record_end)}
            inject["rest"] = perturb.row_inject(idx, record_end, end_frame)
        window = stream.generate(
            rows, texts, rows_noise, fork, record_end, history=prefix, plans=plans, record=True,
            inject=inject.get("window"),
        )  # fmt: skip
        record_peak("window")
        parts = [prefix.expand(len(idx), *prefix.shape[1:]), window.latents]
        if end_frame > record_end:
            rest = stream.generate(
                rows, texts, rows_noise, record_end, end_frame, switch_at_start=True,
                history=torch.cat(parts, dim=2), inject=inject.get("rest"),
            )  # fmt: skip
            parts.append(rest.latents)
        record_peak("continuation")
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
        context_noise=stream.context_noise(noise.context),
    )
