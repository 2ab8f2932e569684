"""The energy block set (docs/method.md 2.4) against the authors' rule, written out plainly.

Their rollout (``models/longlive/trainer/kvpo.py``, ``_rollout``) records the branch trajectories
while it generates the fork chunk from the fork on (``perturb_chunk_noise[:, fork_offset:]``, cut
at ``generation_end_abs``, which is never before the chunk's end), and
``_compute_trajectory_log_prob`` sums over every recorded block. Their eligible starts come from
``plan_perturbation`` (``models/longlive/pipeline/diversity_sampling.py``).
"""

import pytest

from kvpo.method.routing import (
    ENERGY_BLOCKS,
    RoutingError,
    RoutingPlan,
    eligible_start_blocks,
    energy_frames,
)
from kvpo.training.config import TrainConfig

# LongLive's layout (configs/train_kvpo_longlive.yaml)
LONGLIVE = dict(
    num_frame_per_block=3, streaming_max_length=147, streaming_chunk_size=21,
    streaming_min_new_frame=18, slice_last_frames=21, perturb_within_first_x_chunks=7,
    perturb_num_blocks=5, m_nearest_frames=4,
)  # fmt: skip


def _config(**extra) -> TrainConfig:
    cfg = TrainConfig(**{**LONGLIVE, **extra})
    cfg.model_kwargs.sink_size, cfg.model_kwargs.local_attn_size = 3, 12
    return cfg


def _their_energy_blocks() -> dict[int, list[int]]:
    """``{fork frame: block starts of the energy}`` by their rule, for every eligible fork."""
    bs, total, first, rest, x, P = 3, 147, 21, 18, 7, 5
    sink, local, m = 3, 12, 4
    cache_frames = local + 21  # kv_cache_size / frame_seq_length: local_attn_size + slice_last
    n_random = local - sink - m
    chunks, start = [], 0
    while start < total:
        size = min(first if not chunks else rest, total - start)
        chunks.append((start, size))
        start += size
    out = {}
    for chunk_start, size in chunks[:x]:
        blocks_in_chunk = size // bs
        for bi in range(blocks_in_chunk):
            fork = chunk_start + bi * bs
            if fork < local or bi + P > blocks_in_chunk:
                continue
            pool_start = max(sink, fork + (P - 1) * bs - (cache_frames - sink))
            if max(fork - m - pool_start, 0) < n_random:
                continue
            # the trajectory: every block of perturb_chunk_noise[:, fork_offset:]
            chunk_end = chunk_start + size
            generation_end = max(fork + P * bs, chunk_end, total)  # need_local / need_global
            out[fork] = list(range(fork, min(chunk_end, generation_end), bs))
    return out


def _plan(cfg: TrainConfig, start) -> RoutingPlan:
    return RoutingPlan(
        seed=0, step=0, rank=0, mode="dispersed", geometry=cfg.routing_geometry(),
        chunk_index=start.chunk_index, start_frame=start.start_frame,
        pool_start=start.pool_start, pool_end=start.pool_end, num_eligible=1,
    )  # fmt: skip


def _blocks(cfg: TrainConfig, plan: RoutingPlan) -> list[int]:
    frames = cfg.policy_frames(plan)
    return list(range(plan.start_frame, plan.start_frame + frames, cfg.num_frame_per_block))


def test_energy_blocks_are_theirs_at_every_eligible_fork_of_longlive():
    cfg = _config()
    assert cfg.energy_blocks == "chunk"  # the default
    theirs = _their_energy_blocks()
    starts = eligible_start_blocks(cfg.routing_geometry(), cfg.chunks(), 7)
    ours = {s.start_frame: _blocks(cfg, _plan(cfg, s)) for s in starts}
    assert ours == theirs
    # chunks 1..6 each give a fork at block 0 (6 blocks: 5 routed + 1) and at block 1 (5 blocks)
    assert sorted(theirs) == [21, 24, 39, 42, 57, 60, 75, 78, 93, 96, 111, 114]
    assert [len(theirs[f]) for f in sorted(theirs)] == [6, 5] * 6
    assert {s.block_in_chunk for s in starts} == {0, 1}
    assert cfg.policy_frames() == 18  # the most over every start: what the cache is sized for


def test_routed_rule_and_explicit_window():
    cfg = _config(energy_blocks="routed")
    starts = eligible_start_blocks(cfg.routing_geometry(), cfg.chunks(), 7)
    for s in starts:
        assert _blocks(cfg, _plan(cfg, s)) == list(range(s.start_frame, s.start_frame + 15, 3))
    assert cfg.policy_frames() == 15
    cfg = _config(policy_window_frames=30)  # an explicit window overrides the rule
    assert cfg.policy_frames(_plan(cfg, starts[0])) == 30 and cfg.policy_frames() == 30


def test_energy_frames_rejects_bad_input():
    cfg = _config()
    plan = _plan(cfg, eligible_start_blocks(cfg.routing_geometry(), cfg.chunks(), 7)[0])
    with pytest.raises(RoutingError, match="energy_blocks must be one of"):
        energy_frames(plan, cfg.chunks(), "window")
    with pytest.raises(RoutingError, match="chunk 1 is not among the 1 chunks"):
        energy_frames(plan, cfg.chunks()[:1], "chunk")
    plan.start_frame = 36  # the window [36, 51) crosses the end of chunk 1 [21, 39)
    with pytest.raises(RoutingError, match="is not inside chunk 1"):
        energy_frames(plan, cfg.chunks(), "chunk")


def test_choices_agree():
    from kvpo.training.config_parse import choices
    from kvpo.training.gates import PROTECT_MODES

    assert choices()["energy_blocks"] == ENERGY_BLOCKS
    assert choices()["protect_mode"] == PROTECT_MODES


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.kvpo.trainer_fixtures import tiny_generator_dir

    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


@pytest.mark.parametrize("rule, expected", [("chunk", [6, 9]), ("routed", [6])])
def test_the_learner_records_the_energy_blocks(weights, tmp_path, rule, expected):
    """The tiny trainer with chunks [0, 6), [6, 12) and P = 1: a fork at frame 6 (the second
    chunk's first block) records both blocks of the chunk under 'chunk', one under 'routed'."""
    from kvpo.training.distributed import DistInfo
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    cfg = tiny_config(weights, tmp_path, "streaming_min_new_frame=6", f"energy_blocks={rule}")
    trainer = build_learner(cfg, DistInfo())
    step = next(s for s in range(50) if trainer.plan(s, 0).start_frame == 6)
    ro = trainer.rollout(step, trainer.prompts.train(step, 0), 0)
    trainer.cache.free([ro.snapshot])
    S = len(cfg.denoising_step_list)
    assert ro.policy_starts == expected
    assert ro.z.shape[1] == ro.u.shape[1] == len(expected) * S
