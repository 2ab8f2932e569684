"""PagedKVStore: K/V of many sequences in one paged pool, branches sharing pages copy-on-write.

Layout: ``pool`` is ``[num_layers, num_pages, 2, page_size, H, D]`` (index 0 of dim 2 = K, 1 = V);
every layer uses the same page ids, so one page table serves every layer. A sequence is a list of
pages indexed by *logical page position* (token ``t`` lives at position ``t // page_size``);
positions are absolute and survive eviction (an evicted position is a hole). Only the last
position (the tail) can be partially filled, and only it is ever written after a fork; writing
into a tail shared with another sequence first copies it (copy-on-write).

Bookkeeping is plain Python: no call reads device memory, so none synchronises a device; page
tables (:class:`~kvpo_kernels.paged.page_table.PageTableBuilder`) and slot ids reach a CUDA
device through pinned, non-blocking copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpo_kernels.ops.copy_pages import copy_pages
from kvpo_kernels.ops.write_pages import write_pages
from kvpo_kernels.paged.allocator import OutOfPages, PageAllocator
from kvpo_kernels.paged.page_table import PageTableBuilder
from kvpo_kernels.paged.reservation import Reservation, ReservationLedger
from kvpo_kernels.paged.sequence import SequenceState, UnknownSequence


class PagedKVStore:
    """Paged K/V storage for branching sequences (vLLM-style refcounts and copy-on-write).

    Args:
        num_layers, num_pages, page_size, num_heads, head_dim: pool shape
            ``[num_layers, num_pages, 2, page_size, num_heads, head_dim]``.
        dtype, device: of the pool (zero-filled at construction).
        backend: kernel backend for ``copy_pages`` / ``write_pages`` (None: their default).

    Sequences are int handles from :meth:`new_sequence` / :meth:`fork`. Two ways to add tokens:
    :meth:`append` (all layers at once), or :meth:`reserve` once per step and :meth:`write` per
    layer with the :class:`~kvpo_kernels.paged.reservation.Reservation` it returned (for a model
    writing K/V layer by layer during its forward).

    ``table_builder`` (a :class:`~kvpo_kernels.paged.page_table.PageTableBuilder` on the
    store's device) builds :meth:`page_table`'s results; a cache that maps its own rows to pages
    (``kvpo.models.frame_cache``) builds its tables with it too.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("page_size", page_size),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.allocator = PageAllocator(num_pages)
        self.pool = torch.zeros(
            num_layers, num_pages, 2, page_size, num_heads, head_dim, dtype=dtype, device=device
        )
        self.num_layers, self.page_size = num_layers, page_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.backend = backend
        self._seqs: dict[int, SequenceState] = {}
        self._next_id = 0
        self.copied_bytes = 0  # K/V bytes copied on write (shared partial tail pages) so far
        self._reservations = ReservationLedger(num_layers)
        self.table_builder = PageTableBuilder(self.pool.device)

    # ----------------------------------------------------------------- pool and pages
    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.dtype

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def page_bytes(self) -> int:
        """Bytes of one page id across all layers, K and V."""
        return self.pool[:, 0].numel() * self.pool.element_size()

    @property
    def held_bytes(self) -> int:
        """Bytes of K/V held by live pages (all layers)."""
        return (self.num_pages - self.num_free_pages) * self.page_bytes

    @property
    def peak_held_bytes(self) -> int:
        """Most bytes held at once since construction or :meth:`reset_peak`."""
        return self.allocator.peak_in_use * self.page_bytes

    def reset_peak(self) -> None:
        """Start :attr:`peak_held_bytes` anew from what is held now."""
        self.allocator.reset_peak()

    def refcount(self, page_id: int) -> int:
        """How many sequences hold page ``page_id`` (0 = free)."""
        return self.allocator.refcount(page_id)

    def kv_pages(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s pool, ``[num_pages, 2, page_size, H, D]``: a view, no copy."""
        self._check_layer(layer)
        return self.pool[layer]

    # ----------------------------------------------------------------- sequences
    def new_sequence(self) -> int:
        """A new empty sequence."""
        return self._add(SequenceState(pages=[]))

    def sequences(self) -> list[int]:
        """Handles of the live sequences, oldest first."""
        return list(self._seqs)

    def length(self, seq: int) -> int:
        """Tokens held (resident) by ``seq``: what :meth:`gather` returns."""
        s = self._get(seq)
        return s.length - s.evicted * self.page_size

    def total_length(self, seq: int) -> int:
        """Tokens appended over ``seq``'s life, evicted ones included (next token's position)."""
        return self._get(seq).length

    def positions(self, seq: int) -> list[int]:
        """Logical page positions ``seq`` still holds, in order (evicted ones left out)."""
        return self._get(seq).positions()

    def pages(self, seq: int) -> list[int]:
        """Page ids ``seq`` holds, in position order."""
        return self._get(seq).resident()

    def fork(self, seq: int, n: int) -> list[int]:
        """``n`` new sequences sharing every page of ``seq`` (each page's refcount +n)."""
        if n < 0:
            raise ValueError(f"fork needs n >= 0, got {n}")
        s = self._get(seq)
        self._check_not_pending(seq, s, "fork")
        self.allocator.share(s.resident(), holders=n)
        return [self._add(SequenceState(list(s.pages), s.length, s.evicted)) for _ in range(n)]

    def free(self, seq: int) -> None:
        """Drop ``seq``: each of its pages loses a holder and returns to the free list at zero.

        Tokens of ``seq`` reserved but not yet written are never written (other sequences of
        the same reservation still are).
        """
        s = self._get(seq)
        del self._seqs[seq]
        self.allocator.release(s.resident())
        if s.pending:
            self._reservations.sequence_freed(seq)

    def snapshot(self, seq: int) -> int:
        """A frozen copy of ``seq`` sharing its pages (a fork); free it when done."""
        return self.fork(seq, 1)[0]

    def restore(self, seq: int, snapshot: int) -> None:
        """Make ``seq`` hold exactly the pages of ``snapshot`` again; ``snapshot`` stays live."""
        s, snap = self._get(seq), self._get(snapshot)
        self._check_not_pending(seq, s, "restore")
        self._check_not_pending(snapshot, snap, "restore from")
        self.allocator.share(snap.resident())
        self.allocator.release(s.resident())
        s.pages, s.length, s.evicted = list(snap.pages), snap.length, snap.evicted

    def evict(self, seq: int, keep_sink_pages: int, max_pages: int) -> list[int]:
        """Drop the oldest pages after the first ``keep_sink_pages`` positions until ``seq`` holds
        at most ``max_pages``; the tail page is never dropped. Pages are released, not copied.

        Returns the evicted logical positions.
        """
        if keep_sink_pages < 0 or max_pages <= keep_sink_pages:
            raise ValueError(
                f"need 0 <= keep_sink_pages < max_pages (the tail page is never evicted), "
                f"got keep_sink_pages={keep_sink_pages}, max_pages={max_pages}"
            )
        held = self.positions(seq)
        excess = len(held) - max_pages
        victims = [p for p in held[:-1] if p >= keep_sink_pages][: max(excess, 0)]
        self.drop(seq, victims)
        return victims

    def drop(self, seq: int, positions: Sequence[int]) -> None:
        """Release the pages at logical ``positions`` of ``seq`` (any held ones: holes are fine).

        A partially filled tail page cannot be dropped (the next write continues it).
        """
        s = self._get(seq)
        self._check_not_pending(seq, s, "drop pages of")
        positions = sorted(set(int(p) for p in positions))
        tail = len(s.pages) - 1
        for p in positions:
            if not 0 <= p <= tail or s.pages[p] is None:
                raise IndexError(f"sequence {seq} holds no page at position {p}")
            if p == tail and s.length % self.page_size:
                raise ValueError(
                    f"position {p} is the partially filled tail page of sequence {seq} "
                    f"({s.length % self.page_size} of {self.page_size} tokens): "
                    "it cannot be dropped"
                )
        released = [s.pages[p] for p in positions]
        for p in positions:
            s.pages[p] = None
        s.evicted += len(positions)
        self.allocator.release(released)

    # ----------------------------------------------------------------- writing tokens
    def reserve(self, seqs: Sequence[int], num_tokens: int) -> Reservation:
        """Room for ``num_tokens`` new tokens at the end of each sequence.

        Allocates pages, copies shared tail pages (copy-on-write, all layers, one batched
        ``copy_pages``) and counts the tokens in the sequences' lengths. The tokens hold no data
        until :meth:`write` has been called with the returned reservation for every layer;
        until then the sequences cannot be forked, restored, evicted or gathered.

        Returns:
            A :class:`~kvpo_kernels.paged.reservation.Reservation`: ``.slots`` is
            ``[len(seqs), num_tokens]`` int64 on the store's device,
            ``slot = page_id * page_size + offset``; ``.seqs`` the sequences in row order.
        """
        seqs = list(seqs)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"reserve names a sequence more than once: {seqs}")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        states = [self._get(seq) for seq in seqs]
        size = self.page_size
        plans = []  # (copy the tail first?, new pages) per sequence
        holders: dict[int, int] = {}  # partial tail page -> holders not yet moved off it
        for s in states:
            offset = s.length % size
            cow = False
            if num_tokens > 0 and offset > 0:  # the last holder writes in place
                tail = s.pages[-1]
                cow = holders.setdefault(tail, self.allocator.refcount(tail)) > 1
                holders[tail] -= cow
            fresh = -(-(offset + num_tokens) // size) - (1 if offset else 0)
            plans.append((cow, fresh))
        copies = sum(c for c, _ in plans)
        needed = copies + sum(f for _, f in plans)
        if needed > self.num_free_pages:
            raise OutOfPages(
                f"reserving {num_tokens} tokens for {len(seqs)} sequences needs {needed} pages "
                f"({copies} copy-on-write), {self.num_free_pages} of {self.num_pages} are free"
            )
        fresh_pages = iter(self.allocator.allocate(needed))
        src, dst, flat = [], [], []
        for s, (cow, fresh) in zip(states, plans):
            if cow:
                src.append(s.pages[-1])
                dst.append(next(fresh_pages))
                self.allocator.release([s.pages[-1]])
                s.pages[-1] = dst[-1]
            s.pages.extend(next(fresh_pages) for _ in range(fresh))
            start, end = s.length, s.length + num_tokens
            while start < end:
                page, offset = divmod(start, size)
                take = min(size - offset, end - start)
                base = s.pages[page] * size + offset
                flat.extend(range(base, base + take))
                start += take
            s.length = end
            s.pending += 1
        if src:
            self.copied_bytes += len(src) * self.page_bytes
            copy_pages(self.pool, self._ids(src), self._ids(dst), backend=self.backend)
        slots = self._to_device(torch.tensor(flat, dtype=torch.int64).view(len(seqs), num_tokens))
        return self._reservations.open(slots, seqs)

    @torch.compiler.disable
    def write(self, layer: int, reservation: Reservation, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write layer ``layer``'s K/V of reserved tokens (each layer exactly once).

        Args:
            reservation: what :meth:`reserve` of this store returned, not yet closed (it
                closes when its last layer is written).
            k, v: ``[B, T, H, D]`` with ``B = len(reservation.seqs)``,
                ``T = reservation.num_tokens``; the pool's dtype and device. Rows of sequences
                freed since the reservation are not written.
        """
        self._check_layer(layer)
        entry = self._reservations.check(reservation, layer)
        batch, tokens = reservation.slots.shape
        where = f"[B={batch}, T={tokens}, H={self.num_heads}, D={self.head_dim}]"
        self._check_kv(k, v, (batch, tokens), f"{where} (the reservation's rows and tokens)")
        slots = reservation.slots
        if entry.freed_rows:
            live = [r for r in range(batch) if r not in entry.freed_rows]
            rows = torch.tensor(live, dtype=torch.int64, device=slots.device)
            k, v, slots = k.index_select(0, rows), v.index_select(0, rows), slots[rows]
        write_pages(self.pool[layer], k, v, slots, backend=self.backend)
        for seq in self._reservations.written(entry, layer) or ():
            self._seqs[seq].pending -= 1

    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append tokens to ``seq``: fills the tail page, then new pages.

        Args:
            k, v: ``[num_layers, T, H, D]``, the pool's dtype and device.
        """
        self._get(seq)
        tokens = k.shape[1] if k.dim() == 4 else -1
        where = f"[num_layers={self.num_layers}, T, H={self.num_heads}, D={self.head_dim}]"
        self._check_kv(k, v, (self.num_layers, tokens), f"{where} (same as k)")
        reservation = self.reserve([seq], tokens)
        for layer in range(self.num_layers):
            self.write(layer, reservation, k[layer].unsqueeze(0), v[layer].unsqueeze(0))

    # ----------------------------------------------------------------- reading
    def gather(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The resident K and V of ``seq``, each ``[num_layers, length(seq), H, D]`` (a copy)."""
        s = self._get(seq)
        self._check_not_pending(seq, s, "gather")
        held = s.resident()
        pages = self.pool[:, self._ids(held).long()]  # [L, n, 2, page_size, H, D]
        tokens = len(held) * self.page_size
        k = pages[:, :, 0].reshape(self.num_layers, tokens, self.num_heads, self.head_dim)
        v = pages[:, :, 1].reshape(self.num_layers, tokens, self.num_heads, self.head_dim)
        n = self.length(seq)
        return k[:, :n], v[:, :n]

    def page_table(
        self, seqs: Sequence[int], select: Sequence[Sequence[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Page table and context lengths of ``seqs``, built once per step for every layer.

        Args:
            seqs: sequence handles, one row each.
            select: optional, per sequence, the logical page positions to attend in attention
                order (e.g. sink ++ routed older frames ++ nearest frames); default all resident
                positions in order. Positions must be resident and distinct; the partial tail
                page may only come last.

        Returns:
            ``page_table``: ``[len(seqs), max(1, max_pages)]`` int32 page ids (rows padded with
            page 0, never to be read past ``ctx_lens``), and ``ctx_lens``: ``[len(seqs)]``
            int32, the tokens of each row's pages; both on the store's device, new tensors
            that later calls never overwrite (safe to keep for a later backward).
        """
        seqs = list(seqs)
        if select is not None and len(select) != len(seqs):
            raise ValueError(f"select has {len(select)} entries for {len(seqs)} sequences")
        rows, lens = [], []  # page ids and tokens per row
        for i, seq in enumerate(seqs):
            s = self._get(seq)
            if select is None:
                positions = s.positions()
            else:
                positions = [int(p) for p in select[i]]
                s.check_select(i, seq, positions, self.page_size)
            rows.append([s.pages[p] for p in positions])
            lens.append(s.tokens_in(positions, self.page_size))
        return self.table_builder.build(rows, lens)

    # ----------------------------------------------------------------- internals
    def _add(self, s: SequenceState) -> int:
        seq, self._next_id = self._next_id, self._next_id + 1
        self._seqs[seq] = s
        return seq

    def _get(self, seq: int) -> SequenceState:
        s = self._seqs.get(seq) if isinstance(seq, int) else None
        if s is not None:
            return s
        if isinstance(seq, int) and 0 <= seq < self._next_id:
            raise UnknownSequence(f"sequence {seq} was freed")
        raise UnknownSequence(
            f"unknown sequence {seq!r}: this store has made sequences 0..{self._next_id - 1}"
        )

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is outside 0..{self.num_layers - 1}")

    def _check_not_pending(self, seq: int, s: SequenceState, what: str) -> None:
        if s.pending:
            raise RuntimeError(
                f"cannot {what} sequence {seq}: it has reserved tokens not yet written in every "
                "layer; call write() for each layer with the reservation reserve() returned first"
            )

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, lead: tuple[int, int], where: str):
        """``k`` and ``v`` must be ``[*lead, H, D]`` (``where`` spells that out), of the pool's
        dtype and device."""
        expected = (*lead, self.num_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != expected or t.shape != k.shape:
                raise ValueError(f"{name} must be {where}, got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} is {t.dtype}, the store holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the store on {self.device}")

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return self._to_device(torch.tensor(ids, dtype=torch.int32))

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)
