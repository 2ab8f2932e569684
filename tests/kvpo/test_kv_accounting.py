"""K/V accounting of a group step (``benchmarks/kv_accounting.py``).

The reference's counter is checked against a count written out here by hand on a tiny layout
(two chunks of 6 frames, blocks of 3, a sink of 1, a window of 6, a cache of 9 frames, 2
denoising steps, P = 2 routed blocks, G = 2 branches + the anchor, fork at frame 6); ours is
measured at the same layout: no K/V copied, less held.
"""

import dataclasses

import pytest

from benchmarks.kv_accounting import measure_ours
from benchmarks.kv_reference import (
    Layout,
    dense_clones_replay_pass,
    dense_clones_rollout,
    reference_group_step,
    reference_rollout,
)

TINY = Layout(
    total_frames=12, chunk_size=6, min_new_frame=6, frames_per_block=3, sink=1, local_attn=6,
    slice_last_frames=3, denoising_steps=2, perturb_blocks=2, m_nearest=3, branches=2,
    switches=(), log_prob_grad_steps=1, gradient_checkpointing=True,
)  # fmt: skip
R = 9  # cache frames: local_attn 6 + slice_last_frames 3


def test_reference_rollout_by_hand():
    led = reference_group_step(TINY, 6)["rollout"]
    # prefix: blocks 0 and 3, 3 calls each (2 steps + context pass), every call clones the
    # 9-frame cache: 6 x 9. Then save_state (clone on the device, copy to the host) and the deep
    # copy. 3 rows: restore_state (host to device, copy_) and blocks 6 and 9: 6 calls x 9 each;
    # block 9 finds the cache full (9 + 3 > 9): 3 frames evicted, 9 - 3 - 1 = 5 shifted, once in
    # the call's clone and once in the cache, each a clone then an assignment: 4 x 5 per row.
    assert dict(led.copies) == {
        "per-call clone": 6 * 9 + 3 * 6 * 9,
        "save_state: device clone": 9,
        "save_state: device to host": 9,
        "deep copy (host)": 9,
        "restore_state: host to device": 3 * 9,
        "restore_state: device copy_": 3 * 9,
        "rolling shift": 3 * 4 * 5,
    }
    # device cache + the saved state + its deep copy on the host
    assert led.peak == 3 * R and led.peak_at == {"device": R, "host": 2 * R}
    # attention operands: prefix block 0 cats sink 1 + 2 frames, block 3 sink 1 + 5 (3 calls
    # each); the anchor's blocks 6 and 9 cat 1 + 5; a branch cats routed 2 + nearest 3 and then
    # sink 1 + 5 in both blocks, and gathers its 2 routed frames once (clone + cat)
    assert dict(led.operands) == {
        "window cat": 3 * 3 + 3 * 6 + 2 * 6 * (5 + 6) + 6 * 6,
        "routed frames: clone + cat (first call)": 2 * 2 * 2,
    }
    # cross-attention cache: save (clone, to host), deep copy, 3 restores (to device, copy_)
    assert dict(led.text_caches) == {"save_state": 2, "deep copy": 1, "restore_state": 6}


def test_reference_replay_by_hand():
    ledgers = reference_group_step(TINY, 6)
    replay, grad = ledgers["replay"], ledgers["replay_grad"]
    # per branch: the host state materialised (to device, clone); block 6: 2 steps + context
    # pass, block 9: 2 steps, every call a clone of 9; the steps of block 9 find the cache full
    # (the steps don't update it): a shift of 5 frames in the call's clone, 2 x 5 each
    assert dict(replay.copies) == {
        "replay: host to device": 2 * 9,
        "replay: device clone": 2 * 9,
        "per-call clone": 2 * 5 * 9,
        "rolling shift": 2 * 2 * 2 * 5,
    }
    # device: the rollout's cache and one materialised cache at a time; host: the fork state
    assert replay.peak == 3 * R and replay.peak_at == {"device": 2 * R, "host": R}
    # the grad pass: the first step of each block is checkpointed and recomputed by the backward
    # on the final cache (global end 9): block 6 without a shift, block 9 with one (2 x 5)
    assert dict(grad.copies) == {
        "replay: host to device": 2 * 9,
        "replay: device clone": 2 * 9,
        "per-call clone": 2 * 5 * 9 + 2 * 2 * 9,
        "rolling shift": 2 * 2 * 2 * 5 + 2 * 2 * 5,
    }
    # the checkpoint holds both branches' materialised caches until the backward
    assert grad.peak == 4 * R and grad.peak_at == {"device": 3 * R, "host": R}


def test_reference_switches_recache_per_row():
    """A switch after the fork costs every row one recache call (a 9-frame clone); switches move
    to chunk starts, and one at the fork chunk's start is never applied."""
    base = dataclasses.replace(TINY, total_frames=18)  # chunks [0, 6) [6, 12) [12, 18)
    plain = reference_rollout(base, 6)[0]
    for switch, recached in ((12, True), (13, True), (6, False), (3, False)):
        led = reference_rollout(dataclasses.replace(base, switches=(switch,)), 6)[0]
        extra = led.copies["per-call clone"] - plain.copies["per-call clone"]
        assert extra == (3 * R if recached else 0), switch
        assert led.copies["rolling shift"] == plain.copies["rolling shift"]


def test_reference_rejects_an_ineligible_fork():
    with pytest.raises(ValueError, match="no eligible fork"):
        reference_rollout(TINY, 3)  # fewer than local_attn_size = 6 frames of history


def test_dense_clones():
    rollout, replay = dense_clones_rollout(TINY), dense_clones_replay_pass(TINY)
    assert rollout.copied == 3 * R and rollout.peak == 4 * R
    assert replay.copied == 2 * R and replay.peak == 3 * R


def test_ours_copies_nothing_and_holds_less():
    ref = reference_group_step(TINY, 6)
    measured = measure_ours(TINY, forks=(6,))
    for (_, row_batch), m in measured.items():
        assert m["copied_bytes"] == {"rollout": 0, "replay": 0, "replay_grad": 0}, row_batch
        assert all(n > 0 for n in m["frames"].values())
    batched, single = measured[6, 0]["frames"], measured[6, 1]["frames"]
    rollout = max(batched["prefix"], batched["window"], batched["continuation"])
    one_row = max(single["prefix"], single["window"], single["continuation"])
    # one row at a time: within the reference's one device cache, under all it holds
    assert one_row <= R < ref["rollout"].peak
    # all rows in flight: under the dense clones; at this layout (G = 2) under the reference's
    # device cache and host copies too (not at G = 8: 125 frames against 99, RESULTS.md)
    assert rollout < ref["rollout"].peak < dense_clones_rollout(TINY).peak
    assert batched["replay"] <= ref["replay"].peak
    assert batched["replay_grad"] < ref["replay_grad"].peak
