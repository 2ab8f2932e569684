"""One KVPO training step on the toy default: time per phase, and the group rollout batched over
shared pages versus one branch at a time from a restored cache clone.

Configuration: ``python -m kvpo.train``'s defaults (the shipped toy model, G = 8 + anchor,
24-frame videos with switches at 9 and 15, P = 2 routed blocks, 4 Euler steps, fp32).

- ``phases``: median seconds of each phase over ``STEPS`` training steps (rollout, rewards,
  old / reference / current-policy replays, update), as ``PhaseTimer`` records them; the notes
  give each phase's share of the step.
- ``rollout``: the trainer's whole group rollout (prefix, fork, routed window, unrouted
  continuation to frame 24, switches and recache), three ways on the same weights, noise and
  plan: ``sequential clone-restore`` (the reference implementation's way: after the prefix the
  whole cache is cloned, and before each of the G + 1 rows the clone is restored, i.e. copied
  again, and that row generated alone); ``paged, one row at a time`` (``row_micro_batch=1``: rows
  forked from the prefix in turn, no copies); ``paged, batched`` (the default: all G + 1 rows in
  one forward per step over shared pages). Outputs agree (checked). ``held MiB``: K/V bytes held
  at the rollout's peak (the baseline: its saved clone plus the working copy; ours: the prefix
  pages plus every live row's private pages); ``peak MiB``: allocations during the call (the
  paged pool is allocated beforehand, the baseline's clones during the call).

On CPU the suite runs with one intra-op thread (restored afterwards), as the other suites: the
development machine's 2 cores are shared.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from benchmarks.harness import Row, metadata
from kvpo.method.rollout import rollout_group
from kvpo.method.routing import plan_routing
from kvpo.models import FrameCache, generate, recache
from kvpo.streaming import group_seed
from kvpo.training.config_parse import load_config
from kvpo.training.distributed import DistInfo
from kvpo.training.learner import PHASES, Learner
from kvpo.training.phases import PhaseTimer
from kvpo.training.trainer import build_learner

SUITE = "train_step"
STEPS = 5


@pytest.fixture
def trainer(device, one_cpu_thread):
    cfg = load_config(None, [f"device={device}", "show_progress=false"])
    return build_learner(cfg, DistInfo(device=device))


def _add_row(recorder, device, case, provider, ms, **extra):
    recorder.rows.setdefault((SUITE, device.type), []).append(
        Row(SUITE, case, provider, False, ms, ms, ms, None, None, extra)
    )
    recorder.meta.setdefault(device.type, metadata(device))


def test_phase_breakdown(recorder, device, trainer):
    per_phase = {p: [] for p in PHASES}
    totals = []
    for step in range(STEPS + 1):
        timer = PhaseTimer(device)
        trainer.train_step(step, timer)
        if step == 0:
            continue  # warm-up
        for p in PHASES:
            per_phase[p].append(timer.seconds.get(p, 0.0))
        totals.append(sum(timer.seconds.values()))
    total = statistics.median(totals)
    case = f"toy default step (G={trainer.cfg.K}, median of {STEPS})"
    _add_row(recorder, device, case, "whole step", total * 1e3)
    for p in PHASES:
        med = statistics.median(per_phase[p])
        _add_row(recorder, device, case, p, med * 1e3, share=f"{100 * med / total:.0f}%")


@torch.no_grad()
def _sequential_clone_restore(t: Learner, texts, plan, noise):
    """The reference implementation's way: clone the cache after the prefix, restore the clone
    before each row, generate that row alone. Its cache is sized like the reference's fixed
    per-layer cache: one row's resident frames plus a recache segment.
    Returns ``(latents [G+1, ...], held bytes)``."""
    cfg, G, stream = t.cfg, t.cfg.K, t.stream
    per_row = cfg.resident_frames + cfg.model_kwargs.local_attn_size + cfg.num_frame_per_block
    cache = FrameCache.create(
        t.model.config, t.cache.policy, per_row, dtype=t.model.dtype, device=t.model.device
    )
    fork, end = plan.start_frame, cfg.streaming_max_length
    (row,) = cache.new_rows(1)
    prefix = generate(
        t.model, cache, [row], texts[0], noise.noise[:, :, :fork], sampler=stream.sampler,
        renoise=noise.renoise[:, :, :, :fork], switches=stream.switches(texts, 0, fork),
        context_noise=stream.context_noise(noise.context[:, :, :fork]),
        context_sigma=stream.context_sigma,
    ).latents  # fmt: skip
    text_fork = stream.text_at(texts, fork)
    if fork in cfg.switch_frames:
        recache(t.model, cache, [row], prefix, text_fork, fork)
    saved = copy.deepcopy(cache)  # save_state
    held = 2 * cache.held_bytes
    outs = []
    for g in range(G + 1):
        work = copy.deepcopy(saved)  # restore_state

        def plans(frame, g=g, work=work):
            if g == G or not plan.in_window(frame):
                return None
            return [plan.context_frames(g, frame)]

        out = generate(
            t.model, work, [row], text_fork, noise.noise[:, :, fork:end], sampler=stream.sampler,
            renoise=noise.renoise[:, :, :, fork:end], start_frame=fork,
            switches=stream.switches(texts, fork, end), history=prefix, plans=plans,
            context_noise=stream.context_noise(noise.context[:, :, fork:end]),
            context_sigma=stream.context_sigma,
        )  # fmt: skip
        held = max(held, saved.held_bytes + work.held_bytes)
        outs.append(torch.cat([prefix, out.latents], dim=2))
        del work
    return torch.cat(outs), held


@pytest.mark.parametrize("fork", [9, 15])
def test_rollout_batched_vs_one_branch_at_a_time(recorder, device, trainer, fork):
    t, cfg = trainer, trainer.cfg
    prompts = t.prompts.train(0, 0)
    plans = (plan_routing(t.geometry, t.chunks, cfg.K, seed=cfg.seed, step=s) for s in range(99))
    plan = next(p for p in plans if p.start_frame == fork)
    noise = t.stream.noise(group_seed(cfg.seed, 0, 0))
    policy_frames = plan.geometry.window_frames
    with torch.no_grad():
        texts = t.stream.segment_texts(prompts)

    def ours(row_batch):
        with torch.no_grad():
            ro = rollout_group(
                t.stream, texts, plan, noise, policy_frames=policy_frames,
                end_frame=cfg.streaming_max_length, row_batch=row_batch,
            )  # fmt: skip
        t.cache.free([ro.snapshot])
        return ro

    with torch.no_grad():
        reference, ref_held = _sequential_clone_restore(t, texts, plan, noise)
    batched, single = ours(0), ours(1)
    for ro in (batched, single):
        torch.testing.assert_close(ro.latents, reference, rtol=1e-4, atol=1e-4)
    case = f"toy group rollout, G={cfg.K} + anchor, fork at frame {plan.start_frame} -> 24"
    recorder.measure(
        SUITE, case, "sequential clone-restore", lambda: _sequential_clone_restore(
            t, texts, plan, noise), device, baseline=True, held_bytes=ref_held,
    )  # fmt: skip
    recorder.measure(
        SUITE, case, "paged, one row at a time", lambda: ours(1), device,
        held_bytes=max(single.kv_bytes.values()),
    )  # fmt: skip
    recorder.measure(
        SUITE, case, "paged, batched (ours, default)", lambda: ours(0), device,
        held_bytes=max(batched.kv_bytes.values()),
    )  # fmt: skip


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
