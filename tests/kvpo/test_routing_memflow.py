"""MemFlow's routing rule against a transcription of their ``plan_perturbation`` and of their
rolling cache (``models/memflow/pipeline/diversity_sampling.py``, ``wan/modules/
causal_model.py``)."""

import pytest
import torch

from kvpo.method.routing import RoutingError, RoutingGeometry, chunk_layout
from kvpo.method.routing_memflow import memflow_start_blocks, plan_for_rule, plan_memflow

# MemFlow's layout: 147 frames, chunks 21 + 18..., local 12, sink 3, cache 12 + 21 = 33, m = 3
GEOMETRY = RoutingGeometry(3, 3, 12, 33, 3, 5)
CHUNKS = chunk_layout(147, 21, 18)


def _their_eligible(total, chunk, min_new, within, P, F=3, local=12, capacity=33, m=3):
    """Their ``plan_perturbation`` eligibility: ``[(abs_frame, pool)]``."""
    chunks, start = [], 0
    while start < total:
        size = chunk if not chunks else min_new
        chunks.append((start, min(size, total - start)))
        start += size
    n_random, found = local - m, []
    for ci in range(min(within, len(chunks))):
        c_start, new = chunks[ci]
        for bi in range(new // F):
            abs_frame = c_start + bi * F
            if abs_frame < local or bi + P > new // F:
                continue
            pool = max(min(abs_frame, capacity) - m, 0)
            if pool >= n_random:
                found.append((abs_frame, pool))
    return found


def _their_cache_after(block_start, F=3, capacity=33, sink=3):
    """Frame ids in their cache slots after the block at ``block_start`` is written: their
    roll (``num_evicted_tokens``, ``num_rolled_tokens``) on frame ids."""
    cache = []
    for s in range(0, block_start + F, F):
        new = list(range(s, s + F))
        if len(cache) + F > capacity:
            evicted = len(cache) + F - capacity
            rolled = len(cache) - evicted - sink
            cache = cache[:sink] + cache[sink + evicted : sink + evicted + rolled]
        cache = cache + new
    return cache


def test_eligible_starts_and_pools_equal_theirs():
    ours = [(s.start_frame, s.pool_size) for s in memflow_start_blocks(GEOMETRY, CHUNKS, 7)]
    assert ours == _their_eligible(147, 21, 18, 7, 5)
    assert len(ours) > 5


@pytest.mark.parametrize("step", range(12))
def test_routed_frames_are_the_frames_of_their_cache_slots(step):
    """Each branch routes ``local_attn_size - m`` slots of ``[0, pool)``; its frames are what
    their cache holds in those slots at the window's first block; the context has no sink."""
    plan = plan_memflow(GEOMETRY, CHUNKS, 8, seed=7, step=step)
    cache = _their_cache_after(plan.start_frame)
    pool_frames = cache[: plan.pool_end]
    assert plan.pool_end == min(plan.start_frame, 33) - 3
    for g, routed in enumerate(plan.routed):
        assert len(routed) == 9 and routed == sorted(routed) and len(set(routed)) == 9
        assert set(routed) <= set(pool_frames)
        s = plan.start_frame
        assert plan.context_frames(g, s) == routed  # m = F: the nearest frames are the block
    assert plan.rule == "memflow"


def test_dispersed_slices_and_uniform_distribution():
    """Over many draws: the start is uniform over the eligible blocks and every pool slot is
    routed to branch 0 with probability n / pool (their dispersed slices of a uniform
    permutation); adjacent branches share ``n - pool // G`` slots."""
    eligible = _their_eligible(147, 21, 18, 7, 5)
    draws, starts, hits = 1500, {}, {}
    for step in range(draws):
        plan = plan_memflow(GEOMETRY, CHUNKS, 8, seed=11, step=step)
        starts[plan.start_frame] = starts.get(plan.start_frame, 0) + 1
        cache = _their_cache_after(plan.start_frame)
        slot_of = {f: p for p, f in enumerate(cache)}
        slots = [sorted(slot_of[f] for f in r) for r in plan.routed]
        if plan.pool_end == 30:  # the rolled cache: pool of 30 slots, shift 30 // 8 = 3
            for p in slots[0]:
                hits[p] = hits.get(p, 0) + 1
            for a, b in zip(slots, slots[1:]):
                assert len(set(a) & set(b)) >= 9 - 3
    assert set(starts) == {s for s, _ in eligible}
    expected = draws / len(eligible)
    assert all(abs(c - expected) < 5 * expected**0.5 for c in starts.values())
    rolled = sum(c for s, c in starts.items() if min(s, 33) - 3 == 30)
    p = 9 / 30
    sd = (rolled * p * (1 - p)) ** 0.5
    assert set(hits) == set(range(30))
    assert all(abs(h - rolled * p) < 5 * sd for h in hits.values())


def test_rule_dispatch_and_errors():
    longlive = plan_for_rule("longlive", GEOMETRY, CHUNKS, 4, seed=1, step=0)
    assert longlive.rule == "longlive" and longlive.context_frames(0, longlive.start_frame)[:3] == [
        0,
        1,
        2,
    ]
    with pytest.raises(RoutingError, match="routing_rule"):
        plan_for_rule("other", GEOMETRY, CHUNKS, 4, seed=1, step=0)
    with pytest.raises(RoutingError, match="no eligible start"):
        plan_memflow(GEOMETRY, chunk_layout(12, 12, 6), 4, seed=1, step=0)
    assert torch.equal(
        torch.tensor(plan_memflow(GEOMETRY, CHUNKS, 4, seed=1, step=3).routed),
        torch.tensor(plan_memflow(GEOMETRY, CHUNKS, 4, seed=1, step=3).routed),
    )
