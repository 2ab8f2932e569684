"""Frame-level cache policy over ``kvpo_kernels.PagedKVStore``: one page = one latent frame.

A *row* (a branch) is a list of store sequences ("segments"), each holding consecutive frames
from its ``first_frame`` on (logical page position ``p`` = frame ``first_frame + p``). Normally a
row has a sink segment (frames ``[0, sink_size)``) and one main segment. Re-encoding frames that
already exist (the prompt-switch recache) starts a new segment; a frame is served by the newest
segment holding it, and a segment none of whose frames it still serves is freed. Forking a row
forks its segments (page refcounts, no K/V copies).

What a block attends to is a page-table *view*, never a copy of K/V (the tables come from the
store's :class:`~kvpo_kernels.paged.PageTableBuilder`: new tensors per view, so a view pinned
for a later backward keeps its table while later views are built):

- default: the sink frames plus the newest frames, ``local_attn_size`` frames in all with the
  block itself (LongLive: 3 sink + 9 newest, the current 3 included); ``local_attn_size = -1``
  attends to every resident frame;
- a routing plan: any list of resident frames per row, in attention order.

Residency: while the block ``[s, s + F)`` runs, the cache keeps the sink and the non-sink frames
``>= s + F - (resident_frames - sink_size)`` (so ``resident_frames`` counts the sink and the
block); older ones are evicted (their pages released) before the block's view is built, the
convention of :mod:`kvpo.method.routing`. Entries a newer segment re-encoded are released too,
and a writing view releases the row's old entries of the frames it re-encodes (a recache).

*Lean* rows (the group's branches and replays, which only ever read their current view and the
default window after it) keep less: at each view they release every non-sink frame older than
the block that neither the view reads nor a later default view can read (older than
``s - (local_attn_size - sink_size - F)``). A lean row thus holds the sink, its routed frames
and at most ``local_attn_size`` newest frames. :meth:`FrameCache.retain` trims a row to a
given frame set. Frames a row protects (:meth:`FrameCache.protect`, its routed frames) are kept
through residency eviction too until the protection ends.

MemFlow's memory bank (``policy.bank_size > 0``, :mod:`kvpo.models.memory_bank`): each row
holds, per layer, page references to its bank frames; every view inserts the layer's bank pages
after the plan's leading sink frames (so each layer attends through its own page table), forks
share them, :meth:`FrameCache.bank_refresh` and :meth:`FrameCache.bank_record` update them.
With ``policy.sma``, unrouted views add MemFlow's sparse memory activation (``memory``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvpo.models.bank_cache import BankedRows
from kvpo.models.cache_policy import CachePolicy
from kvpo.models.config import WanConfig
from kvpo.models.memory_bank import BankState

if TYPE_CHECKING:
    from kvpo.models.sparse_memory import SparseMemory
    from kvpo_kernels.paged import Reservation


@dataclass
class _Segment:
    seq: int
    first_frame: int
    sink: bool  # holds sink frames only (main segments hold none)


@dataclass
class _Row:
    segments: list[_Segment] = field(default_factory=list)
    lean: bool = False
    protected: frozenset[int] = frozenset()  # frames a lean row keeps for views before ...
    protect_until: int = 0  # ... this frame (its routed frames, through a recache)
    bank: BankState | None = None  # MemFlow's memory bank (policy.bank_size > 0)


@dataclass
class PagedContext:
    """A block's view of its rows' caches: what :class:`~kvpo.models.causal_wan.CausalWan` layers
    attend through (``kvpo.models.causal_wan.BlockContext``).

    ``page_table: [B, N] int32`` and ``ctx_lens: [B] int32`` name each row's cached context;
    ``reservations``: ``(reservation, token_lo, token_hi)``: the block's tokens
    ``[token_lo, token_hi)`` are written through ``reservation`` (a
    :class:`~kvpo_kernels.paged.Reservation` of ``B`` rows and ``token_hi - token_lo`` tokens);
    empty: read-only, e.g. denoising steps and replay. ``block_keys``: ``[L_k]`` long, the
    block's tokens its queries attend after the cached context (None: all of them; the
    prompt-switch recache attends to only the window's part of what it re-encodes).
    ``layer_tables``: per layer ``(page_table, ctx_lens)`` when layers attend to different
    pages (MemFlow's bank; then ``page_table``/``ctx_lens`` are layer 0's), None: every layer
    uses ``page_table``. ``memory``: MemFlow's sparse memory activation over the sink and bank
    frames (``page_table`` then holds the window only), None: off.
    """

    store: object
    page_table: torch.Tensor
    ctx_lens: torch.Tensor
    reservations: list[tuple[Reservation, int, int]] = field(default_factory=list)
    backend: str | None = None
    block_keys: torch.Tensor | None = None
    layer_tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    memory: SparseMemory | None = None

    @property
    def writes(self) -> bool:
        return bool(self.reservations)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write the block's K/V of ``layer`` (if reserved), then routed attention.

        ``q, k, v: [B, L, H, D]`` -> ``[B, L, H, D]``.
        """
        from kvpo_kernels import routed_attention

        for reservation, lo, hi in self.reservations:
            k_part = k[:, lo:hi].detach().contiguous()
            v_part = v[:, lo:hi].detach().contiguous()
            self.store.write(layer, reservation, k_part, v_part)
        table, lens = self.table(layer)
        pages = self.store.kv_pages(layer)
        if self.block_keys is not None:
            k, v = k.index_select(1, self.block_keys), v.index_select(1, self.block_keys)
        if self.memory is not None:  # MemFlow's sparse memory activation
            return self.memory.attend(layer, q, k, v, pages, table, lens, self.backend)
        return routed_attention(q, k, v, pages, table, lens, backend=self.backend)

    def table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(page_table [B, N], ctx_lens [B])`` layer ``layer`` attends through."""
        if self.layer_tables is not None:
            return self.layer_tables[layer]
        return self.page_table, self.ctx_lens


class FrameCache(BankedRows):
    """Rows of frames over a ``PagedKVStore`` whose ``page_size`` is the tokens per frame.

    Args:
        store: the paged store (``page_size`` = tokens per latent frame).
        policy: :class:`CachePolicy`.
        backend: routed-attention backend for the views (None: its default).
    """

    def __init__(self, store, policy: CachePolicy, backend: str | None = None) -> None:
        self.store, self.policy, self.backend = store, policy, backend
        self._rows: dict[int, _Row] = {}
        self._next = 0

    @classmethod
    def create(
        cls,
        config: WanConfig,
        policy: CachePolicy,
        num_pages: int,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        backend: str | None = None,
    ) -> FrameCache:
        """A cache with a new store of ``num_pages`` frames for a model of shape ``config``."""
        from kvpo_kernels.paged import PagedKVStore

        store = PagedKVStore(
            config.num_layers,
            num_pages,
            config.tokens_per_frame,
            config.num_attention_heads,
            config.attention_head_dim,
            dtype=dtype,
            device=device,
        )
        return cls(store, policy, backend)

    # ------------------------------------------------------------------ rows
    def new_rows(self, n: int, *, lean: bool = False) -> list[int]:
        """``n`` empty rows (``lean``: see the module docstring)."""
        return [self._add(_Row(lean=lean, bank=self._new_bank())) for _ in range(n)]

    def fork(self, row: int, n: int, *, lean: bool | None = None) -> list[int]:
        """``n`` rows sharing every frame of ``row`` (page refcounts; no K/V copied); ``lean``
        as ``row`` unless given."""
        src = self._get(row)
        lean = src.lean if lean is None else lean
        kids = [_Row(lean=lean) for _ in range(n)]
        for seg in src.segments:
            for kid, seq in zip(kids, self.store.fork(seg.seq, n)):
                kid.segments.append(_Segment(seq, seg.first_frame, seg.sink))
        if src.bank is not None:
            self.store.allocator.share(sorted(src.bank.pages()), holders=n)
            for kid in kids:
                kid.bank = src.bank.copy()
        return [self._add(kid) for kid in kids]

    def snapshot(self, row: int) -> int:
        """A frozen row sharing ``row``'s frames (a fork); :meth:`free` it when done."""
        return self.fork(row, 1)[0]

    def restore(self, row: int, snapshot: int) -> None:
        """Make ``row`` hold exactly ``snapshot``'s frames again (``snapshot`` stays live)."""
        copy = self._rows.pop(self.fork(snapshot, 1)[0])
        self._release(self._get(row))
        self._rows[row] = copy

    def free(self, rows: int | Sequence[int]) -> None:
        """Drop rows; pages return to the store's free list when no row holds them."""
        for row in [rows] if isinstance(rows, int) else rows:
            self._release(self._get(row))
            del self._rows[row]

    def rows(self) -> list[int]:
        return list(self._rows)

    def protect(self, row: int, frames: Sequence[int], until: int) -> None:
        """Lean ``row`` keeps ``frames`` (e.g. its routed frames) through every view of a block
        starting before frame ``until``, whatever those views read (a recache reads none)."""
        state = self._get(row)
        state.protected, state.protect_until = frozenset(int(f) for f in frames), int(until)

    def retain(self, row: int, frames: Sequence[int]) -> None:
        """Release every frame of ``row`` that is not in ``frames`` (the row keeps no others)."""
        keep = set(int(f) for f in frames)
        state = self._get(row)
        self._trim(state, lambda frame: frame in keep)

    def frames(self, row: int) -> list[int]:
        """Frames ``row`` holds (resident, served), ascending."""
        return sorted(self._frame_pages(self._get(row)))

    def next_frame(self, row: int) -> int:
        """One past the newest frame of ``row`` (0 when empty)."""
        held = self._frame_pages(self._get(row))
        return max(held) + 1 if held else 0

    def bank(self, row: int) -> BankState | None:
        """``row``'s memory bank (None without one): read it, do not change it."""
        return self._get(row).bank

    @property
    def held_bytes(self) -> int:
        """Bytes of K/V in pages held by any row (all layers)."""
        return self.store.held_bytes

    # ------------------------------------------------------------------ views
    def view(
        self,
        rows: Sequence[int],
        start_frame: int,
        num_frames: int,
        *,
        plans: Sequence[Sequence[int] | None] | None = None,
        write: bool = False,
        routed: bool | None = None,
    ) -> PagedContext:
        """The block ``[start_frame, start_frame + num_frames)``'s view of ``rows``.

        Evicts frames that fall out of residency first. Args:
            plans: per row, the cached frames to attend in attention order (a routing plan) or
                None: the policy's sink + newest frames (all resident frames when global).
            write: reserve pages for the block: the forward (or ``write_context``) using this
                view writes its K/V into the rows. Writing frames a row already holds (a
                recache) starts a new segment that then serves them.
            routed: ``plans`` route (no sparse memory activation); default: the rows with a plan.

        Returns:
            A :class:`PagedContext` for ``CausalWan.forward`` / ``write_context``.
        """
        rows = list(rows)
        if plans is not None and len(plans) != len(rows):
            raise ValueError(f"{len(plans)} plans for {len(rows)} rows")
        keep_from = self.policy.resident_start(start_frame, num_frames)
        sink = self.policy.sink_size
        written = range(start_frame, start_frame + num_frames) if write else range(0)
        plans = [None] * len(rows) if plans is None else plans
        routed = [p is not None for p in plans] if routed is None else [routed] * len(rows)
        tables, cuts = [], []
        for i, row in enumerate(rows):
            state = self._get(row)
            guard = state.protected if start_frame < state.protect_until else frozenset()
            self._trim(
                state,
                lambda f, k=keep_from, g=guard: f not in written and (f < sink or f >= k or f in g),
            )
            held = self._frame_pages(state)
            if plans[i] is not None:
                plan = [int(f) for f in plans[i]]
            elif self.policy.local_attn_size == -1:
                plan = sorted(f for f in held if f < start_frame)
            else:
                plan = self.policy.window(start_frame, num_frames)
            if state.lean:
                self._trim_lean(state, plan, start_frame, num_frames)
                held = self._frame_pages(state)
            missing = [f for f in plan if f not in held]
            if missing:
                raise IndexError(
                    f"row {row} (index {i}) attends to frames {missing} that it does not hold; "
                    f"it holds {sorted(held)}"
                )
            if len(set(plan)) != len(plan):
                raise ValueError(f"plan of row {row} names a frame more than once: {plan}")
            tables.append([held[f] for f in plan])
            cuts.append(next((j for j, f in enumerate(plan) if f >= sink), len(plan)))
        parts = self._attended(rows, tables, cuts, [self.policy.sma and not r for r in routed])
        context = PagedContext(self.store, backend=self.backend, **parts)
        if write:
            context.reservations = self._reserve(rows, start_frame, num_frames)
        return context

    # ------------------------------------------------------------------ internals
    def _reserve(self, rows, start_frame, num_frames):
        """Pages for frames ``[start_frame, +num_frames)`` of each row, split at the sink end."""
        sink_end = self.policy.sink_size
        parts = [(start_frame, min(start_frame + num_frames, sink_end), True)]
        parts.append((max(start_frame, sink_end), start_frame + num_frames, False))
        reservations, per_frame = [], self.store.page_size
        for lo, hi, sink in parts:
            if hi <= lo:
                continue
            seqs = [self._target(self._get(row), row, lo, sink) for row in rows]
            reservation = self.store.reserve(seqs, (hi - lo) * per_frame)
            reservations.append(
                (reservation, (lo - start_frame) * per_frame, (hi - start_frame) * per_frame)
            )
        return reservations

    def _target(self, state: _Row, row: int, frame: int, sink: bool) -> int:
        """The sequence frame ``frame`` is appended to: the newest segment of its kind when that
        one ends right before ``frame``, else a new segment (a re-encoding starts one)."""
        newest = self.next_frame(row)
        if frame > newest and not state.lean:  # a lean row may have released its newest frames
            raise ValueError(
                f"row {row} holds frames up to {newest - 1}; writing frame {frame} leaves a gap"
            )
        same_kind = [seg for seg in state.segments if seg.sink == sink]
        if same_kind:
            seg = same_kind[-1]
            end = seg.first_frame + self.store.total_length(seg.seq) // self.store.page_size
            if end == frame:
                return seg.seq
        seg = _Segment(self.store.new_sequence(), frame, sink)
        state.segments.append(seg)
        return seg.seq

    def _frame_pages(self, state: _Row) -> dict[int, int]:
        """Frame -> page id served to ``state`` (newest segment wins)."""
        held: dict[int, int] = {}
        for seg in state.segments:
            for pos, page in zip(self.store.positions(seg.seq), self.store.pages(seg.seq)):
                held[seg.first_frame + pos] = page
        return held

    def _trim(self, state: _Row, keep) -> None:
        """Release the entries of ``state`` whose frame fails ``keep(frame)`` and the entries a
        newer segment re-encoded; free segments left with nothing."""
        owner: dict[int, int] = {}
        for index, seg in enumerate(state.segments):
            for pos in self.store.positions(seg.seq):
                owner[seg.first_frame + pos] = index
        kept = []
        for index, seg in enumerate(state.segments):
            positions = self.store.positions(seg.seq)
            drop = [
                p for p in positions
                if owner[seg.first_frame + p] != index or not keep(seg.first_frame + p)
            ]  # fmt: skip
            if len(drop) == len(positions):
                self.store.free(seg.seq)
                continue
            if drop:
                self.store.drop(seg.seq, drop)
            kept.append(seg)
        state.segments = kept

    def _trim_lean(self, state: _Row, plan, start_frame: int, num_frames: int):
        """A lean row's release before the view of block ``[start_frame, +num_frames)``."""
        policy, read = self.policy, set(plan)
        if start_frame < state.protect_until:
            read |= state.protected
        newest = max(policy.local_attn_size - policy.sink_size - num_frames, 0)
        floor = start_frame - newest if policy.local_attn_size != -1 else 0

        def keep(frame: int) -> bool:
            return frame < policy.sink_size or frame in read or frame >= floor

        self._trim(state, keep)

    def _release(self, state: _Row) -> None:
        for seg in state.segments:
            self.store.free(seg.seq)
        state.segments = []
        if state.bank is not None:
            self.store.allocator.release(sorted(state.bank.pages()))
            state.bank = self._new_bank()

    def _add(self, state: _Row) -> int:
        row, self._next = self._next, self._next + 1
        self._rows[row] = state
        return row

    def _get(self, row: int) -> _Row:
        state = self._rows.get(row)
        if state is None:
            raise KeyError(f"unknown or freed row {row}; live rows: {sorted(self._rows)}")
        return state
