"""K/V held and copied per group step: the KVPO reference implementation against ours.

    python -m benchmarks.kv_accounting           # writes benchmarks/results/kv_accounting-cpu.json
    pytest benchmarks/kv_accounting.py -s        # the same rows through the benchmark recorder

A group step at LongLive's cache layout (the reference's ``configs/train_kvpo_longlive.yaml``):
sink 3, local window 12, a cache of 33 resident frames (12 + ``slice_last_frames`` 21), blocks of
3 frames, 4 denoising steps + 1 context pass per block, P = 5 routed blocks, G = 8 branches + the
anchor; the video is this repository's test layout (``tests/kvpo/test_kv_retention.py``): 72
latent frames in chunks [0, 21) [21, 39) [39, 57) [57, 72), prompt switches at frames 30 and 57.
It covers the prefix of one row, the fork, the G + 1 rows through the routed window and on to
the end of the video (with the recaches at the switches), then the training step's replay of the
G branches. Unit: one *frame* of K/V = K and V of one latent frame over all layers,
``WanConfig.kv_bytes_per_frame``; bytes are given at Wan2.1-1.3B in bf16 (30 layers x 1560
tokens x 1536 x 2 x 2 B = 287,539,200 B = 274.2 MiB a frame). Held = K/V buffers alive at the
peak, device and host; copied = K/V bytes a scheme copies from one buffer to another (writing a
block's freshly computed K/V is not a copy). Forks at 24 (ours: the switch at 30 inside the
routed window) and 42.

Schemes:

- ``reference``: the KVPO authors' LongLive code, Richard-Zhang-AI/KVPO at b0c4c9d, *counted*
  (not run) by :func:`reference_rollout` / :func:`reference_replay_pass`, which walk its
  operations in order, one citation per line. What it does: one dense cache of 33 frames per
  layer on the device; ``save_state`` clones it (every slot, unused ones too) and moves the clone
  to the host, the rollout deep-copies that host state, and ``restore_state`` copies it back
  (host to device, then ``copy_``) before the pre-fork part of the fork chunk and before every
  row; every attention call clones the layer's whole cache (``temp_k = kv_cache["k"].clone()``);
  once the cache is full, the first denoising step of each block shifts it left in place (in the
  clone and again in the cache). The replay (``_compute_trajectory_log_prob``, run three times
  per training step as configured: pi_old, pi_init and pi_theta with 2 grad-carrying steps)
  materialises the host state on the device per branch (``.to(device).clone()``) and clones the
  layer cache at every call as well; under gradient checkpointing the grad pass keeps each
  branch's materialised cache alive until the backward (the checkpoint holds its arguments), and
  the backward recomputes the checkpointed calls, clones included.
- ``batched dense clones``: the naive batched rollout of ``bench_group_rollout.py``: every row
  gets a dense clone of the 33-frame fork-state cache; the fork state is kept for the replay;
  copies = the clones (rows write in place after that). Counted.
- ``ours``: ``kvpo.method.rollout.rollout_group`` (then ``kvpo.method.replay.replay_energies``)
  *measured* on a tiny-width causal Wan (1 layer, dim 32, 1 token a frame, fp32) at the same
  layout (4 denoising steps, routing plans from ``plan_routing``), with all G + 1 rows batched
  (``row_batch=0``) and one row at a time (``row_batch=1``): frames held = the paged store's
  exact per-phase peak (``GroupRollout.kv_bytes``, ``peak_held_bytes``) over its page size (one
  page = one frame, so the count does not depend on the width); copied = ``store.copied_bytes``
  (copy-on-write of shared pages). No K/V goes to or from the host.

Reported separately (not in ``copied``): the reference's attention-operand assembly (each call
``torch.cat``s sink ++ window, and sink ++ routed ++ nearest in the routed window, once more for
the routed frames' first gather; ours' ``cpp`` CPU and Triton kernels read the pages in place,
the ``torch`` fallback gathers a like operand) and its copies of the cross-attention (text) cache,
512 tokens a layer, which ``save_state`` / ``restore_state`` / the replay copy with the frames.

The reference applies switches at chunk starts (``align_switch_to_chunk: true``): 30 becomes 39.
A switch at the start of the fork chunk is skipped: the pre-fork part of that chunk runs with the
prefix's prompt and no switch check, and the rows start in the fork's segment, so nothing
recaches (nor resets the cross-attention cache) there; with the fork at 42 the reference
recaches only at 57, once per row. Ours switches at 30 and 57 as laid out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from benchmarks.harness import RESULTS_DIR, Row, metadata
from benchmarks.kv_reference import (
    TEXT_TOKENS,
    Layout,
    Ledger,
    dense_clones_replay_pass,
    dense_clones_rollout,
    reference_group_step,
)
from kvpo.models import WAN_1_3B

SUITE = "kv_accounting"
LONGLIVE = Layout()  # the layout of the module docstring
FORKS = (24, 42)
REFERENCE = "reference: sequential restore (KVPO LongLive code)"
DENSE = "batched dense clones"
OURS_BATCHED = "ours: paged, G+1 rows batched"
OURS_ONE_ROW = "ours: paged, one row at a time"


# --------------------------------------------------------------------- ours, measured
class _Ours:
    """A tiny-width causal Wan at ``layout`` (1 layer, 1 head, 4 x 4 latent frames, fp32)."""

    def __init__(self, layout: Layout) -> None:
        from kvpo.method.routing import RoutingGeometry, chunk_layout
        from kvpo.models import CachePolicy, CausalWan, FlowSchedule, tiny_config
        from kvpo.streaming import VideoNoise

        L = self.layout = layout
        torch.manual_seed(0)
        cfg = tiny_config(
            num_layers=1, num_attention_heads=1, latent_height=4, latent_width=4, text_dim=16
        )
        self.model = CausalWan.from_config(cfg).eval()
        with torch.no_grad():
            self.texts = [
                self.model.encode_text(torch.randn(1, 5, 16)) for _ in range(len(L.switches) + 1)
            ]
        self.policy = CachePolicy(L.sink, L.local_attn, L.resident, L.frames_per_block)
        self.geometry = RoutingGeometry(
            L.frames_per_block, L.sink, L.local_attn, L.resident, L.m_nearest, L.perturb_blocks
        )
        S = L.denoising_steps
        self.schedule = FlowSchedule(tuple(1000.0 * (S - i) / S for i in range(S)))
        self.chunks = chunk_layout(L.total_frames, L.chunk_size, L.min_new_frame)
        shape = (cfg.in_channels, L.total_frames, 4, 4)
        self.noise = VideoNoise.draw(5, shape, S, "cpu", torch.float32)

    def plan(self, fork: int):
        from kvpo.method.routing import plan_routing

        for seed in range(500):
            plan = plan_routing(self.geometry, self.chunks, self.layout.branches, seed=seed, step=0)
            if plan.start_frame == fork:
                return plan
        raise ValueError(f"no routing seed gives a fork at frame {fork}")

    def measure(self, fork: int, row_batch: int) -> dict:
        """Rollout, then a no-grad replay of the G branches in micro-batches of ``row_batch``
        (0: all) and a grad replay of all of them (``log_prob_grad_steps``) with its backward:
        frames held at each phase's peak, K/V bytes copied."""
        from kvpo.method.replay import replay_energies, step_weights
        from kvpo.method.rollout import rollout_group
        from kvpo.rewards.clips import VideoLayout
        from kvpo.streaming import StreamingGenerator
        from kvpo.video_model import VideoModel

        L, G = self.layout, self.layout.branches
        window = L.perturb_blocks * L.frames_per_block
        video_model = VideoModel(
            self.model, None, None, lambda f: f, (self.noise.noise.shape[1], 4, 4)
        )
        stream = StreamingGenerator(
            video_model, self.policy, self.schedule, rule="x0",
            layout=VideoLayout(L.total_frames, L.switches), rows=G + 1, window_frames=window,
        )  # fmt: skip
        store = stream.cache.store
        ro = rollout_group(
            stream, self.texts, self.plan(fork), self.noise, policy_frames=window,
            end_frame=L.total_frames, row_batch=row_batch,
        )  # fmt: skip
        frames = {phase: b // store.page_bytes for phase, b in ro.kv_bytes.items()}
        copied = {"rollout": store.copied_bytes}
        weights = step_weights(self.schedule, "sigma2")
        step = row_batch or G
        store.reset_peak()
        with torch.no_grad():
            for lo in range(0, G, step):
                replay_energies(
                    stream, ro, self.texts, weights, branches=list(range(lo, min(lo + step, G))),
                    grad_steps=L.log_prob_grad_steps,
                )  # fmt: skip
        frames["replay"] = store.peak_held_bytes // store.page_bytes
        copied["replay"] = store.copied_bytes - copied["rollout"]
        store.reset_peak()
        with torch.enable_grad():
            energy = replay_energies(
                stream, ro, self.texts, weights, branches=list(range(G)),
                grad_steps=L.log_prob_grad_steps,
            )  # fmt: skip
            energy.sum().backward()
        self.model.zero_grad(set_to_none=True)
        frames["replay_grad"] = store.peak_held_bytes // store.page_bytes
        copied["replay_grad"] = store.copied_bytes - copied["rollout"] - copied["replay"]
        stream.cache.free([ro.snapshot])
        return {
            "frames": frames,
            "copied_bytes": copied,
            "page_bytes": store.page_bytes,
            "backend": _backend(stream.cache.backend),
        }


def _backend(name: str | None) -> str:
    """The routed-attention backend the views resolve to on the CPU."""
    from kvpo_kernels import registry
    from kvpo_kernels.ops.routed_attention import OP

    return registry.resolve(OP, torch.device("cpu"), name)


def measure_ours(layout: Layout, forks=FORKS) -> dict[tuple[int, int], dict]:
    """``{(fork, row_batch): measured}`` for row_batch 0 (all G + 1 rows) and 1."""
    ours = _Ours(layout)
    return {(fork, rb): ours.measure(fork, rb) for fork in forks for rb in (0, 1)}


# --------------------------------------------------------------------- rows
def _mib(frames: float, frame_bytes: int) -> float:
    return round(frames * frame_bytes / 2**20, 1)


def _ledger_extra(led: Ledger, frame_bytes: int, text_bytes: int) -> dict:
    extra = {
        "kv_frames_held": led.peak,
        **{f"held_{where}_frames": n for where, n in sorted(led.peak_at.items()) if n},
        "copied_frames": led.copied,
        "copied_MiB": _mib(led.copied, frame_bytes),
    }
    extra.update({f"{kind} (frames)": n for kind, n in led.copies.items()})
    if led.operands:
        extra["attention operand cat (frames, not in copied)"] = sum(led.operands.values())
    text = sum(led.text_caches.values())
    if text:
        extra["text cache copies (MiB, not in copied)"] = round(text * text_bytes / 2**20, 1)
    return extra


def build_rows(layout: Layout = LONGLIVE, forks=FORKS, ours: dict | None = None) -> list[Row]:
    """One row per (case, scheme): cases ``fork F: rollout``, ``fork F: replay pass, no grad``
    and ``fork F: replay pass, grad``; the reference is the baseline. ``held_bytes`` and MiB at
    Wan2.1-1.3B bf16; ``median_ms`` 0: nothing is timed."""
    frame_bytes = WAN_1_3B.kv_bytes_per_frame(2)
    text_bytes = 2 * WAN_1_3B.num_layers * TEXT_TOKENS * WAN_1_3B.dim * 2
    ours = measure_ours(layout, forks) if ours is None else ours
    rows = []
    for fork in forks:
        ref = reference_group_step(layout, fork)
        dense = {
            "rollout": dense_clones_rollout(layout),
            "replay": dense_clones_replay_pass(layout),
            "replay_grad": dense_clones_replay_pass(layout),
        }
        titles = {
            "rollout": "rollout (prefix, fork, G+1 rows to the end)",
            "replay": "replay pass of the G branches, no grad (pi_old, pi_init)",
            "replay_grad": f"replay pass, {layout.log_prob_grad_steps} grad steps (pi_theta)",
        }
        for phase, title in titles.items():
            case = f"fork {fork}: {title}"
            base = ref[phase]
            note = (
                "counted from its code; "
                + {
                    "rollout": f"switches applied {layout.aligned_switches()} (chunk-aligned)",
                    "replay": "3 passes a train step: pi_old, pi_init (no grad), pi_theta (grad)",
                    "replay_grad": "checkpoint keeps each branch's cache until backward",
                }[phase]
            )
            ref_extra = _ledger_extra(base, frame_bytes, text_bytes)
            # each call's clone of one layer's cache is alive during the call, on top of held
            one_layer = layout.resident * frame_bytes / WAN_1_3B.num_layers
            ref_extra["per-call clone alive (MiB, one layer)"] = round(one_layer / 2**20, 1)
            entries = [
                (REFERENCE, True, base.peak, ref_extra, note),
                (DENSE, False, dense[phase].peak, _ledger_extra(dense[phase], frame_bytes, 0), ""),
            ]
            for name, rb in ((OURS_BATCHED, 0), (OURS_ONE_ROW, 1)):
                m = ours[fork, rb]
                if phase == "replay_grad" and rb == 1:
                    continue  # ours replays the grad pass in one batch, as the learner does
                held = (
                    m["frames"][phase]
                    if phase != "rollout"
                    else max(m["frames"][p] for p in ("prefix", "window", "continuation"))
                )
                copied = m["copied_bytes"][phase]
                extra = {
                    "kv_frames_held": held,
                    "copied_frames": copied // m["page_bytes"],
                    "copied_MiB": _mib(copied / m["page_bytes"], frame_bytes),
                    "copied_bytes_measured": copied,
                }
                if phase == "rollout":
                    extra.update({f"{p}_frames": m["frames"][p] for p in ("prefix", "window")})
                    extra["continuation_frames"] = m["frames"]["continuation"]
                    extra["switches applied"] = list(layout.switches)
                    extra["host copies"] = 0
                how = {"rollout": "rows", "replay": "branches", "replay_grad": "branches"}[phase]
                how = f"{how} one at a time" if rb else f"{how} in one batch"
                entries.append((name, False, held, extra, f"measured ({how}; {m['backend']})"))
            for name, baseline, held, extra, note in entries:
                extra = {
                    **extra,
                    "held_vs_reference": round(held / base.peak, 2),
                    "copied_vs_reference": round(extra["copied_frames"] / base.copied, 4),
                }
                extra["note"] = f"{note or 'counted'}; not a timing (median 0)"
                rows.append(
                    Row(SUITE, case, name, baseline, 0.0, 0.0, 0.0, None, held * frame_bytes, extra)
                )
    return rows


def write(rows: list[Row], directory: Path = RESULTS_DIR) -> Path:
    path = directory / f"{SUITE}-cpu.json"
    payload = {
        "meta": {
            **metadata(torch.device("cpu")),
            "notes": "not a timing (median_ms 0): K/V frames held at the peak and K/V copied; "
            "bytes at Wan2.1-1.3B bf16 (one frame = 287,539,200 B); reference counted from its "
            "code, ours measured on a tiny-width model (one page = one frame)",
        },
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def summary(rows: list[Row]) -> str:
    """A plain table: frames held and copied per (case, scheme)."""
    lines = [f"{'case':<80} {'scheme':<52} {'held fr':>8} {'copied fr':>10} {'copied GiB':>11}"]
    for r in rows:
        gib = r.extra["copied_MiB"] / 1024
        lines.append(
            f"{r.case:<80} {r.provider:<52} {r.extra['kv_frames_held']:>8} "
            f"{r.extra['copied_frames']:>10} {gib:>11.1f}"
        )
    return "\n".join(lines)


def test_kv_accounting(recorder):
    """Benchmark case: the rows, into ``benchmarks/results/kv_accounting-cpu.json``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = build_rows()
    finally:
        torch.set_num_threads(threads)
    recorder.rows.setdefault((SUITE, "cpu"), []).extend(rows)
    recorder.meta.setdefault("cpu", metadata(torch.device("cpu")))
    assert all(r.extra["copied_frames"] == 0 for r in rows if r.provider.startswith("ours"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    rows = build_rows()
    print(summary(rows))
    print(f"wrote {write(rows)}")


if __name__ == "__main__":
    main()
