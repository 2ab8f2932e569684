"""The real-architecture training step (``benchmarks/wan_step.py``) with fewer frames: one layer of
Wan2.1-1.3B's shape (dim 1536, 12 x 128 heads, FFN 8960, text 512 x 4096), LongLive's cache
layout and the full step (prefix with a recache, routed window with a switch inside it,
rewards, three replays, update). K/V bounds are counted here from the layout.
"""

import math
from argparse import Namespace

import pytest

from benchmarks.wan_step import run, table
from kvpo.training.learner import PHASES

SINK, LOCAL, F, P, G = 3, 12, 3, 5, 8


@pytest.fixture(scope="module")
def result():
    args = Namespace(
        layers=1, latent=(16, 4, 4), frames=39, switches=[15, 27], dtype="float32",
        device="cpu", row_micro_batch=0, seed=42,
    )  # fmt: skip
    return run(args)


def test_real_layer_shape_step_runs_every_phase(result):
    cfg = result["config"]
    assert (cfg["dim"], cfg["heads"], cfg["head_dim"], cfg["ffn_dim"]) == (1536, 12, 128, 8960)
    assert cfg["tokens_per_frame"] == (4 // 2) * (4 // 2)
    # K and V, one layer, 4 tokens of 12 x 128 fp32 values each
    assert result["kv_bytes_per_frame"] == 2 * 1 * 4 * 12 * 128 * 4
    assert math.isfinite(result["loss"])
    assert all(result["seconds"][p] > 0 for p in PHASES)
    # the grad-carrying replay keeps activations for backward; the no-grad ones do not
    assert result["alloc_bytes"]["replay_grad"] > 1.5 * result["alloc_bytes"]["replay_old"]
    assert result["copied_kv_bytes"] == 0


def test_kv_held_by_each_phase_is_bounded_by_the_layout(result):
    fork = result["config"]["fork_frame"]
    assert fork in (21, 24)  # the eligible starts of 39 frames in chunks of 21 + 18
    shared = set(range(SINK)) | set(range(fork - (LOCAL - SINK - F), fork))
    for routed in result["routed"]:
        shared |= set(routed)
    frame = result["kv_bytes_per_frame"]
    kv = {p: result["kv_bytes"][p] / frame for p in PHASES}
    assert kv["rollout"] <= len(shared) + (G + 1) * LOCAL, kv
    assert kv["replay_old"] <= len(shared) + G * LOCAL, kv
    # the grad replay pins each block's view for the backward: a row's window frames and its
    # recache at the switch stay held until then
    assert kv["replay_grad"] <= len(shared) + G * (P * F + LOCAL), kv
    # after the rollout only the trimmed fork snapshot is held
    assert kv["rewards"] == len(shared), kv


def test_planner_predicts_the_rollout_kv_within_10_percent(result):
    frame = result["kv_bytes_per_frame"]
    for phase, held in result["rollout_kv_bytes"].items():
        predicted = result["planned"]["kv_frames"][phase]
        assert held / frame <= predicted <= 1.1 * held / frame, (phase, held / frame, predicted)
    assert "planner: rollout K/V frames prefix" in table(result)
