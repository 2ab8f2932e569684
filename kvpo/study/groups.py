"""One group per exploration mode and held-out (prompt, seed) pair, measured.

Every mode rolls out through the trainer's own :class:`~kvpo.training.learner.Learner` (same
model, prompts, fork, shared noise and reward; only ``learner.exploration`` changes), so the
numbers are those a training step would see. Per group, over the frames from the fork on:

- diversity of the G branches (:mod:`kvpo.study.diversity`), and their mean distance to the
  anchor;
- rewards: per component the branches' standard deviation and their mean minus the anchor's
  (local clip and global clips), the spread of the weighted total;
- learning signal: whether no branch beats the anchor, whether all G advantages are equal after
  fusion scaling and clipping (spread <= 1e-6), the old policy's TVE energies (mean, std);
- toy models: semantic attribute spread and the on-manifold scores of the branches' and the
  anchor's frames (:mod:`kvpo.study.manifold`).

Pair ``i`` is training step ``STEP_OFFSET + i`` of rank 0 for the plan and the noise.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from kvpo.method.advantages import any_branch_beats_anchor, group_advantages, weighted_total
from kvpo.study.diversity import attribute_spread, attributes, latent_l2, pixel_difference
from kvpo.study.manifold import manifold_scores

STEP_OFFSET = 1_000_000
SIGNALS = ("local", "global")


def _rms_to(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of the RMS difference of ``x [G, ...]`` to ``ref [...]``."""
    d = (x.double() - ref.double()).flatten(1)
    return float((d * d).mean(1).sqrt().mean())


def _signal_metrics(name: str, signal, weights: dict[str, float]) -> dict[str, float]:
    branches, anchor = signal
    out = {}
    for comp in weights:
        r, a = branches[comp].double(), float(anchor[comp])
        out[f"reward_{name}/{comp}/branch_std"] = float(r.std())
        out[f"reward_{name}/{comp}/branch_minus_anchor"] = float(r.mean()) - a
    total = weighted_total(branches, weights).double()
    out[f"signal/reward_std_{name}"] = float(total.std())
    out[f"signal/branch_minus_anchor_{name}"] = float(total.mean()) - float(
        weighted_total(anchor, weights)
    )
    out[f"signal/reward_range_{name}"] = float(total.max() - total.min())
    return out


def _routed_content_change(learner, ro) -> float:
    """How different is what routing shows the window's first block: the mean over branches of
    the latent RMS difference between its routed frames ``R_g`` and the frames of the default
    view they stand in for (the default view's frames between the sink and the nearest frames,
    oldest first, paired in order with the sorted ``R_g``; all in the shared prefix)."""
    plan, F = ro.plan, learner.stream.frames_per_block
    fork = plan.start_frame
    nearest_start = fork + F - plan.geometry.m_nearest_frames
    sink = plan.geometry.sink_size
    default = [f for f in learner.stream.cache.policy.window(fork, F) if sink <= f < nearest_start]
    prefix = ro.latents[-1].double()  # the anchor: every row holds the same prefix
    diffs = []
    for routed in plan.routed:
        pairs = list(zip(routed, default))
        if pairs:
            a = torch.stack([prefix[:, r] for r, _ in pairs])
            b = torch.stack([prefix[:, d] for _, d in pairs])
            diffs.append(float(((a - b) ** 2).mean().sqrt()))
    return sum(diffs) / len(diffs) if diffs else 0.0


def _manifold_metrics(prefix: str, frames: torch.Tensor, world) -> dict[str, float]:
    scores = manifold_scores(frames.flatten(0, 1), world)
    return {
        f"{prefix}/render_distance": float(scores.distance.double().mean()),
        f"{prefix}/valid_share": float(scores.valid.double().mean()),
        f"{prefix}/one_object": float(scores.one_object.double().mean()),
        f"{prefix}/palette": float(scores.palette.double().mean()),
        f"{prefix}/clean_background": float(scores.clean_background.double().mean()),
    }


def measure_group(learner, ro, prompts, *, world=None, anchor_cache: dict | None = None):
    """Every per-group number (module docstring) of rollout ``ro``, and ``extra``: ``videos``
    (the decoded group ``[G + 1, T, 3, H, W]``), ``advantages`` and ``totals`` for branch grids.
    ``world``: the toy world's :class:`~kvpo.toy.world.WorldConfig` (None: not a toy model, no
    toy measurements); ``anchor_cache``: this pair's anchor measurements (filled when empty)."""
    cfg, G = learner.cfg, learner.cfg.K
    weights = cfg.reward_weights
    local, global_, videos = learner.rewards(ro, prompts)
    adv = group_advantages(local, global_, weights, learner.advantage_config)
    beats = any_branch_beats_anchor([local, global_], weights)
    with torch.no_grad():
        energy = learner.energies(ro, prompts, list(range(G)), "old").double()
    fork, vfork = ro.fork, learner.video_model.video_frame(ro.fork)
    lat, vid = ro.latents[:, :, fork:], videos[:, vfork:]
    final = adv.final.double()
    out = {
        "fork": fork,
        "diversity/latent_l2": latent_l2(lat[:G]),
        "diversity/pixel": pixel_difference(vid[:G]),
        "diversity/latent_l2_to_anchor": _rms_to(lat[:G], lat[G]),
        "diversity/pixel_to_anchor": float((vid[:G].double() - vid[G].double()).abs().mean()),
        "signal/no_branch_beats_anchor": float(not beats),
        "signal/all_advantages_equal": float(final.max() - final.min() <= 1e-6),
        "signal/advantage_abs_mean": float(final.abs().mean()),
        "signal/energy_mean": float(energy.mean()),
        "signal/energy_std": float(energy.std()),
    }
    for name, signal in zip(SIGNALS, (local, global_)):
        if signal is not None:
            out.update(_signal_metrics(name, signal, weights))
    if learner.exploration.routes:
        out["routing/content_change"] = _routed_content_change(learner, ro)
    if world is not None:
        spread = attribute_spread(attributes(vid[:G]))
        out.update({f"semantic/{k}": v for k, v in spread.items()})
        present = attributes(videos[G:]).present[0].double()
        out["anchor/object_before_fork"] = float(present[:vfork].mean())
        out["anchor/object_after_fork"] = float(present[vfork:].mean())
        out.update(_manifold_metrics("manifold/branches", vid[:G], world))
        cache = anchor_cache if anchor_cache is not None else {}
        if not cache:
            cache.update(_manifold_metrics("manifold/anchor", vid[G:], world))
        out.update(cache)
        out["manifold/branches_minus_anchor_distance"] = (
            out["manifold/branches/render_distance"] - out["manifold/anchor/render_distance"]
        )
    signal = local if local is not None else global_
    extra = {
        "videos": videos,
        "advantages": adv.final.tolist(),
        "totals": weighted_total(signal[0], weights).tolist(),
        "anchor_total": float(weighted_total(signal[1], weights)),
    }
    return out, extra


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error over groups (SE 0 for one group)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(groups: list[dict]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "se", "n"}}`` over the groups' numeric metrics."""
    keys = [k for k, v in groups[0].items() if isinstance(v, int | float)]
    out = {}
    for key in keys:
        mean, se = mean_se([float(g[key]) for g in groups])
        out[key] = {"mean": mean, "se": se, "n": len(groups)}
    return out


def run_mode(learner, mode: str, pairs, prompts, *, world=None, hook=None, anchors=None):
    """Roll out and measure one group per pair in ``mode``; returns ``(groups, shown,
    attention)``: ``shown`` the ``extra`` of :func:`measure_group` (with its ``pair`` index) of
    the pair whose anchor shows the object in most frames after the fork (the first pair when
    not measured), the same pair in every mode; ``attention``: :meth:`AttentionMass.summary` of
    branches and anchor, or None without a hook."""
    G = learner.cfg.K
    base = learner.exploration
    learner.exploration = replace(base, mode=mode)
    if hook is not None:
        hook.reset()
    groups, first, shown = [], None, None
    anchors = anchors if anchors is not None else {}
    try:
        for i, (p, _) in enumerate(pairs):
            step = STEP_OFFSET + i
            if hook is not None:
                hook.blocks = set(learner.plan(step, 0).block_starts)
            ro = learner.rollout(step, list(prompts[p]), 0)
            try:
                cache = anchors.setdefault(i, {})
                metrics, extra = measure_group(
                    learner, ro, list(prompts[p]), world=world, anchor_cache=cache
                )
            finally:
                learner.cache.free([ro.snapshot])
            groups.append(metrics)
            score = metrics.get("anchor/object_after_fork", 0.0)
            if shown is None or score > shown[1]:  # the same pair in every mode: one anchor
                shown, first = (i, score), {**extra, "pair": i}
    finally:
        learner.exploration = base
        if hook is not None:
            hook.blocks = set()
    attention = None
    if hook is not None:
        attention = {"branches": hook.summary(list(range(G))), "anchor": hook.summary([G])}
    return groups, first, attention
