"""Reservation handles of ``PagedKVStore.reserve`` and a store's ledger of open reservations.

A :class:`Reservation` is what ``reserve`` returns and ``write`` takes (like vLLM v1's
``KVCacheBlocks``, it hides the store's bookkeeping). The :class:`ReservationLedger` knows which
handles are open, which layers each still waits for and which of its rows were freed meanwhile;
it recognises a handle by its store id and serial number, never by the identity of a tensor.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class Reservation:
    """Tokens reserved by ``PagedKVStore.reserve``; pass it to ``PagedKVStore.write`` per layer.

    Attributes:
        slots: ``[B, T]`` int64 on the store's device: token ``t`` of row ``b`` goes to slot
            ``slots[b, t] = page_id * page_size + offset``.
        seqs: the ``B`` sequence handles, in row order (the rows of ``write``'s ``k`` and ``v``).
        store_id, serial: which store made it, and its number there.

    By the time a reservation exists, the store has done everything else: pages are allocated,
    shared partial tails copied (copy-on-write) and the sequences' lengths count the tokens.
    It closes once every layer is written; until then its sequences cannot be forked,
    restored, evicted or gathered.
    """

    slots: torch.Tensor
    seqs: tuple[int, ...]
    store_id: int
    serial: int

    @property
    def num_tokens(self) -> int:
        """``T``, tokens reserved per sequence."""
        return self.slots.shape[1]

    def __repr__(self) -> str:
        return (
            f"Reservation(#{self.serial} of PagedKVStore #{self.store_id}, seqs={list(self.seqs)}, "
            f"num_tokens={self.num_tokens})"
        )


@dataclass
class _Open:
    handle: Reservation
    unwritten: set[int]  # layers not yet written
    freed_rows: set[int] = field(default_factory=set)  # rows whose sequence was freed meanwhile


class ReservationLedger:
    """The open reservations of one store (plain Python, keyed by serial number)."""

    _store_ids = itertools.count()

    def __init__(self, num_layers: int) -> None:
        self.store_id = next(ReservationLedger._store_ids)
        self.num_layers = num_layers
        self._serials = itertools.count()
        self._open: dict[int, _Open] = {}

    def open(self, slots: torch.Tensor, seqs: list[int]) -> Reservation:
        """A new open reservation of ``slots [len(seqs), T]`` waiting for every layer."""
        handle = Reservation(slots, tuple(seqs), self.store_id, next(self._serials))
        self._open[handle.serial] = _Open(handle, set(range(self.num_layers)))
        return handle

    def check(self, reservation: object, layer: int) -> _Open:
        """The open entry of ``reservation`` if layer ``layer`` may be written through it."""
        if not isinstance(reservation, Reservation):
            hint = ""
            if isinstance(reservation, torch.Tensor):
                hint = " (a tensor: pass the reservation itself, not its slots)"
            raise TypeError(
                f"write() takes the Reservation returned by reserve(), got "
                f"{type(reservation).__name__}{hint}"
            )
        if reservation.store_id != self.store_id:
            raise ValueError(
                f"reservation #{reservation.serial} was made by PagedKVStore "
                f"#{reservation.store_id}, this is PagedKVStore #{self.store_id}"
            )
        entry = self._open.get(reservation.serial)
        if entry is None or entry.handle is not reservation:
            raise ValueError(
                f"reservation #{reservation.serial} (sequences {list(reservation.seqs)}) is "
                f"closed: all {self.num_layers} layers were written; reserve() again for new tokens"
            )
        if layer not in entry.unwritten:
            raise ValueError(
                f"layer {layer} of reservation #{reservation.serial} was already written; "
                f"layers still to write: {sorted(entry.unwritten)}"
            )
        return entry

    def written(self, entry: _Open, layer: int) -> list[int] | None:
        """Mark ``layer`` written; when that closes the reservation, its live sequences."""
        entry.unwritten.discard(layer)
        if entry.unwritten:
            return None
        del self._open[entry.handle.serial]
        seqs = entry.handle.seqs
        return [seq for row, seq in enumerate(seqs) if row not in entry.freed_rows]

    def sequence_freed(self, seq: int) -> None:
        """``seq`` was freed: no open reservation writes its row any more."""
        for entry in self._open.values():
            if seq in entry.handle.seqs:
                entry.freed_rows.add(entry.handle.seqs.index(seq))
