"""Causal History Routing (CHR): which cached frames each branch of a group attends to.

The rule of docs/method.md section 2. A video of ``total_frames`` latent frames is generated in
blocks of ``num_frame_per_block`` frames and laid out in streaming chunks (the first chunk
``chunk_size`` frames, then ``min_new_frame`` frames each). Inside a perturbed window of
``P = perturb_num_blocks`` consecutive blocks, branch ``g`` attends to

    sink frames [0, sink)  ++  R_g  ++  the m nearest frames (current block included)

which is as long as the normal window of ``local_attn_size`` frames: ``n_random = local_attn_size
- sink - m``. ``R_g`` is a sorted subset of ``n_random`` frames drawn without replacement from the
*pool*: non-sink frames that are older than the nearest frames of the window's first block and
still resident in the cache at the window's last block, so the same frames are attended for the
whole window (context passes included). Frames keep their absolute positions.

Cache residency (the convention of the model's sink + window policy): the cache holds at most
``resident_frames`` frames, the sink and the block being generated included, so while block
``[s, s + bs)`` is generated the resident non-sink history is
``[max(sink, s + bs - (resident_frames - sink)), s)``.

A start block is eligible when it has at least ``local_attn_size`` frames of history, its P
blocks lie inside one chunk among the first ``perturb_within_first_x_chunks``, and the pool holds
at least ``n_random`` frames. The start is drawn uniformly among eligible blocks. Branch sets:
``"dispersed"`` (the reference code: consecutive, wrapping slices of one random permutation of the
pool, offset by ``max(1, pool // G)`` per branch) or ``"independent"`` (one permutation per
branch). Every draw comes from a generator seeded by ``(seed, step, rank)``; the plan is a plain
record (:meth:`RoutingPlan.to_dict`) stored with the rollout for replay.

Energy blocks (:func:`energy_frames`): the blocks whose replayed TVE forms a branch's energy start
at the fork. ``"chunk"`` (the authors' runs): every block of the fork chunk from the fork on, the
routed blocks and the unrouted ones after them (at LongLive's layout: 6 blocks for a fork at the
chunk's first block, 5 otherwise); ``"routed"``: the P routed blocks only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

ROUTING_MODES = ("dispersed", "independent")
ENERGY_BLOCKS = ("chunk", "routed")


class RoutingError(ValueError):
    """A routing configuration that cannot produce a plan."""


@dataclass(frozen=True)
class Chunk:
    """One streaming chunk: latent frames ``[start_frame, start_frame + new_frames)``."""

    index: int
    start_frame: int
    new_frames: int

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.new_frames


def chunk_layout(total_frames: int, chunk_size: int, min_new_frame: int) -> list[Chunk]:
    """Streaming chunks of a video: ``chunk_size`` frames first, then ``min_new_frame`` each."""
    if total_frames <= 0 or chunk_size <= 0 or min_new_frame <= 0:
        raise RoutingError(
            f"chunk layout needs positive sizes, got total_frames={total_frames}, "
            f"chunk_size={chunk_size}, min_new_frame={min_new_frame}"
        )
    chunks, start = [], 0
    while start < total_frames:
        size = chunk_size if not chunks else min_new_frame
        end = min(start + size, total_frames)
        chunks.append(Chunk(len(chunks), start, end - start))
        start = end
    return chunks


@dataclass(frozen=True)
class RoutingGeometry:
    """Frame counts that fix the routing rule (all in latent frames).

    ``local_attn_size``: frames a block attends to, sink and current block included (12).
    ``resident_frames``: frames the cache holds, sink and current block included (33).
    """

    num_frame_per_block: int = 3
    sink_size: int = 3
    local_attn_size: int = 12
    resident_frames: int = 33
    m_nearest_frames: int = 4
    perturb_num_blocks: int = 5

    @property
    def n_random(self) -> int:
        return self.local_attn_size - self.sink_size - self.m_nearest_frames

    @property
    def window_frames(self) -> int:
        return self.perturb_num_blocks * self.num_frame_per_block

    def check(self) -> None:
        """Raise :class:`RoutingError` when the counts cannot describe a routed window."""
        bs, sink, m = self.num_frame_per_block, self.sink_size, self.m_nearest_frames
        if bs <= 0 or self.perturb_num_blocks <= 0 or sink < 0:
            raise RoutingError(
                f"need num_frame_per_block > 0, perturb_num_blocks > 0 and sink_size >= 0, got "
                f"{bs}, {self.perturb_num_blocks} and {sink}"
            )
        if m < bs:
            raise RoutingError(
                f"m_nearest_frames={m} must cover the current block (num_frame_per_block={bs})"
            )
        if self.n_random < 1:
            raise RoutingError(
                f"n_random = local_attn_size - sink_size - m_nearest_frames = "
                f"{self.local_attn_size} - {sink} - {m} = {self.n_random}: routing needs at least "
                "one routed frame (raise local_attn_size or lower m_nearest_frames)"
            )
        if self.resident_frames < self.local_attn_size:
            raise RoutingError(
                f"resident_frames={self.resident_frames} is smaller than the attention window "
                f"local_attn_size={self.local_attn_size}"
            )

    def resident_start(self, block_start: int) -> int:
        """First resident non-sink frame while the block starting at ``block_start`` runs."""
        capacity = self.resident_frames - self.sink_size
        return max(self.sink_size, block_start + self.num_frame_per_block - capacity)

    def pool_bounds(self, start_frame: int) -> tuple[int, int]:
        """``[lo, hi)``: routing pool of the window whose first block starts at ``start_frame``."""
        last_block = start_frame + (self.perturb_num_blocks - 1) * self.num_frame_per_block
        lo = self.resident_start(last_block)
        hi = start_frame + self.num_frame_per_block - self.m_nearest_frames
        return lo, max(lo, hi)


@dataclass(frozen=True)
class StartBlock:
    """An eligible first block of the perturbed window."""

    chunk_index: int
    block_in_chunk: int
    start_frame: int
    pool_start: int
    pool_end: int

    @property
    def pool_size(self) -> int:
        return self.pool_end - self.pool_start


def eligible_start_blocks(
    geometry: RoutingGeometry, chunks: list[Chunk], within_first_x_chunks: int
) -> list[StartBlock]:
    """Every start block satisfying the eligibility rule, in frame order."""
    bs, P = geometry.num_frame_per_block, geometry.perturb_num_blocks
    found = []
    for chunk in chunks[: max(within_first_x_chunks, 0)]:
        for b in range(chunk.new_frames // bs - P + 1):
            start = chunk.start_frame + b * bs
            if start < geometry.local_attn_size:
                continue
            lo, hi = geometry.pool_bounds(start)
            if hi - lo >= geometry.n_random:
                found.append(StartBlock(chunk.index, b, start, lo, hi))
    return found


def routing_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed mixing ``(seed, step, rank)`` (numpy SeedSequence; stable across runs)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass
class RoutingPlan:
    """A drawn routing plan for one group: the window and each branch's routed frames.

    Redrawn identically by :func:`plan_routing` from ``(seed, step, rank)`` and the geometry.
    ``routed[g]``: sorted absolute frame indices ``R_g`` (length ``n_random``) of branch ``g``.
    ``rule``: ``"longlive"`` (contexts start with the sink) or ``"memflow"`` (no separate sink:
    :mod:`kvpo.method.routing_memflow`).
    """

    seed: int
    step: int
    rank: int
    mode: str
    geometry: RoutingGeometry
    chunk_index: int
    start_frame: int
    pool_start: int
    pool_end: int
    num_eligible: int
    routed: list[list[int]] = field(default_factory=list)
    rule: str = "longlive"

    @property
    def end_frame(self) -> int:
        """One past the last frame of the perturbed window."""
        return self.start_frame + self.geometry.window_frames

    @property
    def block_starts(self) -> list[int]:
        bs = self.geometry.num_frame_per_block
        return list(range(self.start_frame, self.end_frame, bs))

    def in_window(self, block_start: int) -> bool:
        return self.start_frame <= block_start < self.end_frame

    def context_frames(self, branch: int, block_start: int) -> list[int]:
        """Cached frames branch ``branch`` attends to while generating ``block_start``.

        ``sink ++ R_g ++ nearest cached frames`` (rule ``"memflow"``: ``R_g ++ nearest``), in
        attention order; the current block's own frames are attended as new tokens and are not
        listed.
        """
        if not self.in_window(block_start):
            raise RoutingError(
                f"block at frame {block_start} is outside the routed window "
                f"[{self.start_frame}, {self.end_frame})"
            )
        g = self.geometry
        nearest_start = block_start + g.num_frame_per_block - g.m_nearest_frames
        sink = 0 if self.rule == "memflow" else g.sink_size
        return (
            list(range(sink)) + list(self.routed[branch]) + list(range(nearest_start, block_start))
        )

    def distinct_sets(self) -> int:
        """How many different routed sets the branches hold."""
        return len({tuple(r) for r in self.routed})

    def mean_pairwise_jaccard(self) -> float:
        """Mean Jaccard overlap of the routed sets over branch pairs (1 = all identical)."""
        sets = [set(r) for r in self.routed]
        pairs = [len(a & b) / max(len(a | b), 1) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        return float(np.mean(pairs)) if pairs else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> RoutingPlan:
        fields = dict(record)
        fields["geometry"] = RoutingGeometry(**fields["geometry"])
        fields["routed"] = [list(map(int, r)) for r in fields["routed"]]
        return cls(**fields)


def check_request(mode: str, num_branches: int) -> None:
    """Raise :class:`RoutingError` unless ``mode`` is a routing mode and there is a branch."""
    if mode not in ROUTING_MODES:
        raise RoutingError(f"routing mode must be one of {ROUTING_MODES}, got {mode!r}")
    if num_branches < 1:
        raise RoutingError(f"need at least one branch, got {num_branches}")


def branch_sets(
    pool: list[int], n: int, num_branches: int, mode: str, gen: torch.Generator
) -> list[list[int]]:
    """``num_branches`` sorted sets of ``n`` members of ``pool``: ``"dispersed"`` takes shifted
    slices of one permutation (the sets overlap as little as the pool allows), ``"independent"``
    draws each set on its own."""
    size = len(pool)
    if mode == "dispersed":
        perm = torch.randperm(size, generator=gen).tolist()
        shift = max(1, size // num_branches)
        return [
            sorted(pool[perm[(g * shift + i) % size]] for i in range(n))
            for g in range(num_branches)
        ]
    if mode == "independent":
        return [
            sorted(pool[i] for i in torch.randperm(size, generator=gen)[:n].tolist())
            for _ in range(num_branches)
        ]
    raise RoutingError(f"routing mode must be one of {ROUTING_MODES}, got {mode!r}")


def plan_routing(
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
    """Draw the routing plan of one group (``num_branches`` = G branches; the anchor is unrouted).

    Deterministic in ``(seed, step, rank)``. Raises :class:`RoutingError` when no start block is
    eligible, saying which condition failed.
    """
    geometry.check()
    check_request(mode, num_branches)
    eligible = eligible_start_blocks(geometry, chunks, within_first_x_chunks)
    if not eligible:
        total = chunks[-1].end_frame if chunks else 0
        raise RoutingError(
            f"no eligible start block for the routed window in a {total}-frame video: need a "
            f"start with >= {geometry.local_attn_size} frames of history, "
            f"{geometry.perturb_num_blocks} blocks of {geometry.num_frame_per_block} frames "
            f"inside one of the first {within_first_x_chunks} chunks "
            f"(sizes {[c.new_frames for c in chunks[:within_first_x_chunks]]}), and a pool of "
            f">= n_random={geometry.n_random} older resident frames "
            f"(resident_frames={geometry.resident_frames}, sink_size={geometry.sink_size}, "
            f"m_nearest_frames={geometry.m_nearest_frames})"
        )
    mixed = routing_seed(seed, step, rank)
    gen = torch.Generator().manual_seed(mixed)
    pick = eligible[int(torch.randint(len(eligible), (1,), generator=gen).item())]
    pool = list(range(pick.pool_start, pick.pool_end))
    routed = branch_sets(pool, geometry.n_random, num_branches, mode, gen)
    return RoutingPlan(
        seed=seed,
        step=step,
        rank=rank,
        mode=mode,
        geometry=geometry,
        chunk_index=pick.chunk_index,
        start_frame=pick.start_frame,
        pool_start=pick.pool_start,
        pool_end=pick.pool_end,
        num_eligible=len(eligible),
        routed=routed,
    )


def energy_frames(plan: RoutingPlan, chunks: list[Chunk], rule: str = "chunk") -> int:
    """Frames from the fork whose blocks form the energy (see the module docstring).

    ``"chunk"``: ``chunks[plan.chunk_index].end_frame - plan.start_frame``; ``"routed"``:
    ``P * num_frame_per_block``. Raises :class:`RoutingError` for another rule or a plan whose
    chunk is not in ``chunks``.
    """
    if _is_routed(rule):
        return plan.geometry.window_frames
    if not 0 <= plan.chunk_index < len(chunks):
        raise RoutingError(f"plan's chunk {plan.chunk_index} is not among the {len(chunks)} chunks")
    chunk = chunks[plan.chunk_index]
    if not (chunk.start_frame <= plan.start_frame and plan.end_frame <= chunk.end_frame):
        raise RoutingError(
            f"plan's window [{plan.start_frame}, {plan.end_frame}) is not inside chunk "
            f"{chunk.index} [{chunk.start_frame}, {chunk.end_frame})"
        )
    return chunk.end_frame - plan.start_frame


def max_energy_frames(
    geometry: RoutingGeometry, chunks: list[Chunk], within_first_x_chunks: int, rule: str = "chunk"
) -> int:
    """The most frames :func:`energy_frames` gives over every eligible start (sizes the cache);
    the routed window when no start is eligible."""
    if _is_routed(rule):
        return geometry.window_frames
    ends = [
        chunks[b.chunk_index].end_frame - b.start_frame
        for b in eligible_start_blocks(geometry, chunks, within_first_x_chunks)
    ]
    return max(ends, default=geometry.window_frames)


def _is_routed(rule: str) -> bool:
    if rule not in ENERGY_BLOCKS:
        raise RoutingError(f"energy_blocks must be one of {ENERGY_BLOCKS}, got {rule!r}")
    return rule == "routed"
