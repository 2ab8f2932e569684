"""MemFlow's routing rule: the draw over ``local_attn_size - m`` cache slots (no sink).

Their rule (``models/memflow/pipeline/diversity_sampling.py``: ``plan_perturbation``,
``_build_dispersed_branch_plans``; ``wan/modules/causal_model.py``:
``_build_perturbed_local_window``): with a cache of ``C = resident_frames`` frames (sink
included), the window's first block at frame ``s`` is eligible when ``s >= local_attn_size``,
its ``P`` blocks lie in one of the first chunks, and the *pool* of
``min(s, C) - m`` cache slots holds at least ``n = local_attn_size - m`` slots. Branch ``g``
draws ``n`` slots of ``[0, pool)`` (dispersed: slices of one permutation), and attends to

    bank  ++  the frames of its slots  ++  the m nearest frames (current block included)

with no separate sink (a slot below ``sink_size`` is a sink frame). Slot ``p`` holds frame
``p`` until the cache has rolled; at block ``s`` with ``s + F > C`` it holds frame ``p`` for a
sink slot and ``s + F - C + p`` otherwise. Their cache keeps rolling inside the window, so their
slots name newer frames at each later block; here a slot is mapped to its frame at the window's
first block and that absolute frame is attended for the whole window (the rows protect it from
eviction), as the LongLive port does (docs/reference-differences.md).
"""

from __future__ import annotations

import torch

from kvpo.method.routing import (
    Chunk,
    RoutingError,
    RoutingGeometry,
    RoutingPlan,
    StartBlock,
    branch_sets,
    check_request,
    plan_routing,
    routing_seed,
)

ROUTING_RULES = ("longlive", "memflow")


def memflow_slots(geometry: RoutingGeometry) -> int:
    """``n = local_attn_size - m``: routed cache slots per branch."""
    return geometry.local_attn_size - geometry.m_nearest_frames


def slot_frame(geometry: RoutingGeometry, block_start: int, slot: int) -> int:
    """The frame cache slot ``slot`` holds once the block at ``block_start`` is written."""
    capacity, F = geometry.resident_frames, geometry.num_frame_per_block
    if slot < geometry.sink_size or block_start + F <= capacity:
        return slot
    return block_start + F - capacity + slot


def memflow_start_blocks(
    geometry: RoutingGeometry, chunks: list[Chunk], within_first_x_chunks: int
) -> list[StartBlock]:
    """Eligible first blocks under MemFlow's rule; ``pool_start, pool_end`` are the slot range
    ``[0, min(s, C) - m)``."""
    bs, P, m = geometry.num_frame_per_block, geometry.perturb_num_blocks, geometry.m_nearest_frames
    found = []
    for chunk in chunks[: max(within_first_x_chunks, 0)]:
        for b in range(chunk.new_frames // bs - P + 1):
            start = chunk.start_frame + b * bs
            pool = max(min(start, geometry.resident_frames) - m, 0)
            if start >= geometry.local_attn_size and pool >= memflow_slots(geometry):
                found.append(StartBlock(chunk.index, b, start, 0, pool))
    return found


def plan_memflow(
    geometry: RoutingGeometry,
    chunks: list[Chunk],
    num_branches: int,
    *,
    seed: int,
    step: int,
    rank: int = 0,
    within_first_x_chunks: int = 7,
    mode: str = "dispersed",
) -> RoutingPlan:
    """MemFlow's plan of one group (module docstring); ``routed[g]`` are absolute frames
    (sorted), ``rule = "memflow"``. Deterministic in ``(seed, step, rank)``."""
    n, bs = memflow_slots(geometry), geometry.num_frame_per_block
    check_request(mode, num_branches)
    if geometry.m_nearest_frames < bs or n < 1:
        raise RoutingError(
            f"MemFlow routing needs num_frame_per_block={bs} <= m_nearest_frames="
            f"{geometry.m_nearest_frames} < local_attn_size={geometry.local_attn_size}"
        )
    eligible = memflow_start_blocks(geometry, chunks, within_first_x_chunks)
    if not eligible:
        raise RoutingError(
            f"no eligible start block for MemFlow's routed window: need a start >= "
            f"local_attn_size={geometry.local_attn_size}, {geometry.perturb_num_blocks} blocks "
            f"inside one of the first {within_first_x_chunks} chunks, and min(start, "
            f"resident_frames={geometry.resident_frames}) - m_nearest_frames >= {n} slots"
        )
    gen = torch.Generator().manual_seed(routing_seed(seed, step, rank))
    pick = eligible[int(torch.randint(len(eligible), (1,), generator=gen).item())]
    slots = branch_sets(list(range(pick.pool_end)), n, num_branches, mode, gen)
    routed = [sorted(slot_frame(geometry, pick.start_frame, p) for p in s) for s in slots]
    return RoutingPlan(
        seed=seed, step=step, rank=rank, mode=mode, geometry=geometry,
        chunk_index=pick.chunk_index, start_frame=pick.start_frame, pool_start=0,
        pool_end=pick.pool_end, num_eligible=len(eligible), routed=routed, rule="memflow",
    )  # fmt: skip


def plan_for_rule(rule: str, *args, **kwargs) -> RoutingPlan:
    """The plan under ``rule`` (``"longlive"``: :func:`kvpo.method.routing.plan_routing`,
    ``"memflow"``: :func:`plan_memflow`); same arguments."""
    if rule == "longlive":
        return plan_routing(*args, **kwargs)
    if rule == "memflow":
        return plan_memflow(*args, **kwargs)
    raise RoutingError(f"routing_rule must be one of {ROUTING_RULES}, got {rule!r}")
