"""CHR routing planner against a simulated cache (explicit frame lists, no bound arithmetic)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpo.method.routing import (
    RoutingError,
    RoutingGeometry,
    RoutingPlan,
    chunk_layout,
    eligible_start_blocks,
    plan_routing,
)

LONGLIVE = RoutingGeometry(
    num_frame_per_block=3,
    sink_size=3,
    local_attn_size=12,
    resident_frames=33,
    m_nearest_frames=4,
    perturb_num_blocks=5,
)


def simulated_history(g: RoutingGeometry, block_start: int) -> list[int]:
    """Cached frames while the block at ``block_start`` runs: append blocks one by one into a
    cache of ``resident_frames`` slots (the current block takes slots too), evicting the oldest
    non-sink frame when full."""
    cache: list[int] = []
    for s in range(0, block_start + 1, g.num_frame_per_block):
        for f in range(s, s + g.num_frame_per_block):
            cache.append(f)
            if len(cache) > g.resident_frames:
                cache.pop(g.sink_size)
    return [f for f in cache if f < block_start]


def oracle_pool(g: RoutingGeometry, start: int) -> list[int]:
    blocks = range(start, start + g.window_frames, g.num_frame_per_block)
    nearest_first = set(range(start + g.num_frame_per_block - g.m_nearest_frames, start))
    common = set(simulated_history(g, start))
    for s in blocks:
        common &= set(simulated_history(g, s))
    return sorted(f for f in common if f >= g.sink_size and f not in nearest_first)


def oracle_eligible(g, chunks, x):
    out = []
    for c in chunks[:x]:
        for s in range(c.start_frame, c.end_frame, g.num_frame_per_block):
            if s + g.window_frames > c.end_frame or s < g.local_attn_size:
                continue
            if len(oracle_pool(g, s)) >= g.n_random:
                out.append(s)
    return out


def test_longlive_numbers():
    """The reference layout: chunks 21, 18, 18...; n_random = 12 - 3 - 4 = 5."""
    chunks = chunk_layout(147, 21, 18)
    assert [c.new_frames for c in chunks] == [21] + [18] * 7
    assert LONGLIVE.n_random == 5
    starts = [b.start_frame for b in eligible_start_blocks(LONGLIVE, chunks, 7)]
    assert starts == oracle_eligible(LONGLIVE, chunks, 7)
    # chunk 0 = frames [0, 21): a 15-frame window must start at 12 at the latest... but it
    # would end at 27 > 21, so chunk 0 has none; chunk 1 = [21, 39) admits starts 21 and 24.
    assert starts[:2] == [21, 24]
    plan = plan_routing(LONGLIVE, chunks, 8, seed=42, step=1, rank=0)
    ctx = plan.context_frames(3, plan.start_frame)
    assert len(ctx) + LONGLIVE.num_frame_per_block == LONGLIVE.local_attn_size
    assert ctx[:3] == [0, 1, 2] and ctx[-1] == plan.start_frame - 1


geometries = st.builds(
    lambda bs, sink, extra_m, n, slack, P: RoutingGeometry(
        num_frame_per_block=bs,
        sink_size=sink,
        local_attn_size=sink + bs + extra_m + n,
        resident_frames=sink + bs + extra_m + n + slack,
        m_nearest_frames=bs + extra_m,
        perturb_num_blocks=P,
    ),
    bs=st.integers(1, 3),
    sink=st.integers(0, 3),
    extra_m=st.integers(0, 2),
    n=st.integers(1, 5),
    slack=st.integers(0, 24),
    P=st.integers(1, 5),
)


@settings(max_examples=60, deadline=None)
@given(
    g=geometries,
    total_blocks=st.integers(4, 30),
    first_blocks=st.integers(1, 10),
    next_blocks=st.integers(1, 8),
    x=st.integers(1, 8),
    branches=st.integers(1, 9),
    mode=st.sampled_from(["dispersed", "independent"]),
    step=st.integers(0, 10**6),
    rank=st.integers(0, 7),
)
def test_plan_properties(g, total_blocks, first_blocks, next_blocks, x, branches, mode, step, rank):
    bs = g.num_frame_per_block
    chunks = chunk_layout(total_blocks * bs, first_blocks * bs, next_blocks * bs)
    expected = oracle_eligible(g, chunks, x)
    kw = dict(within_first_x_chunks=x)
    assert [b.start_frame for b in eligible_start_blocks(g, chunks, x)] == expected
    if not expected:
        with pytest.raises(RoutingError, match="no eligible start block"):
            plan_routing(g, chunks, branches, seed=7, step=step, rank=rank, mode=mode, **kw)
        return
    plan = plan_routing(g, chunks, branches, seed=7, step=step, rank=rank, mode=mode, **kw)
    assert plan.start_frame in expected
    pool = oracle_pool(g, plan.start_frame)
    assert list(range(plan.pool_start, plan.pool_end)) == pool
    assert len(plan.routed) == branches
    for g_idx, routed in enumerate(plan.routed):
        assert routed == sorted(set(routed)) and len(routed) == g.n_random
        assert set(routed) <= set(pool)
        for s in plan.block_starts:
            ctx = plan.context_frames(g_idx, s)
            # same length as the normal window; every attended frame is in the cache
            assert len(ctx) + bs == g.local_attn_size
            cached = set(simulated_history(g, s))
            assert set(ctx) <= cached, (s, ctx, sorted(cached))
            assert len(set(ctx)) == len(ctx)
    # deterministic in (seed, step, rank); the record round-trips
    again = plan_routing(g, chunks, branches, seed=7, step=step, rank=rank, mode=mode, **kw)
    assert again == plan == RoutingPlan.from_dict(plan.to_dict())


def test_dispersed_is_slices_of_one_permutation():
    """Branches take consecutive slices (offset pool // G) of one permutation: with a pool of
    G * n frames the sets partition the pool; independent draws overlap."""
    g = RoutingGeometry(3, 3, 12, 60, 4, 1)
    chunks = chunk_layout(60, 60, 60)
    # pick a plan whose pool is exactly G * n = 20 frames
    for step in range(200):
        plan = plan_routing(g, chunks, 4, seed=1, step=step, within_first_x_chunks=1)
        if plan.pool_end - plan.pool_start == 20:
            break
    assert plan.pool_end - plan.pool_start == 20
    union = sorted(f for r in plan.routed for f in r)
    assert union == list(range(plan.pool_start, plan.pool_end))
    assert plan.mean_pairwise_jaccard() == 0.0 and plan.distinct_sets() == 4
    indep = plan_routing(
        g, chunks, 4, seed=1, step=step, within_first_x_chunks=1, mode="independent"
    )
    assert indep.distinct_sets() >= 2
    assert sorted(f for r in indep.routed for f in r) != union or indep.mean_pairwise_jaccard() > 0


def test_seeds_differ_per_step_and_rank():
    chunks = chunk_layout(147, 21, 18)
    plans = {
        (s, r): plan_routing(LONGLIVE, chunks, 8, seed=0, step=s, rank=r)
        for s in range(4)
        for r in range(4)
    }
    keys = {(p.start_frame, tuple(map(tuple, p.routed))) for p in plans.values()}
    assert len(keys) == 16


def test_start_is_uniform_over_eligible():
    chunks = chunk_layout(147, 21, 18)
    eligible = [b.start_frame for b in eligible_start_blocks(LONGLIVE, chunks, 7)]
    counts = dict.fromkeys(eligible, 0)
    n = 2000
    for step in range(n):
        counts[plan_routing(LONGLIVE, chunks, 2, seed=5, step=step).start_frame] += 1
    expected = n / len(eligible)
    assert all(abs(c - expected) < 5 * expected**0.5 for c in counts.values()), counts


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(m_nearest_frames=2), "must cover the current block"),
        (dict(m_nearest_frames=9), "routing needs at least one routed frame"),
        (dict(resident_frames=10), "smaller than the attention window"),
    ],
)
def test_bad_geometry(kwargs, match):
    g = RoutingGeometry(**{**LONGLIVE.__dict__, **kwargs})
    with pytest.raises(RoutingError, match=match):
        plan_routing(g, chunk_layout(147, 21, 18), 8, seed=0, step=0)


def test_resident_cache_too_small_for_any_window():
    g = RoutingGeometry(**{**LONGLIVE.__dict__, "resident_frames": 14})
    with pytest.raises(RoutingError, match="pool of >= n_random=5"):
        plan_routing(g, chunk_layout(147, 21, 18), 8, seed=0, step=0)
