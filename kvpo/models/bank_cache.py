"""The memory-bank half of :class:`~kvpo.models.frame_cache.FrameCache` (MemFlow's bank,
:mod:`kvpo.models.memory_bank`): refresh, record, page references and per-layer page tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpo.models.memory_bank import BankState, frame_saliency, refresh_layer
from kvpo.models.sparse_memory import SparseMemory


class BankedRows:
    """Bank operations of a frame cache; the cache provides ``store``, ``policy`` and
    ``_get(row)`` / ``_frame_pages(state)`` (rows with a ``bank``: :class:`BankState` or None)."""

    @torch.no_grad()  # a discrete selection: the scores carry no gradient
    def bank_refresh(self, rows: Sequence[int], text=None) -> None:
        """MemFlow's refresh before a block's first denoising step (and in a recache): move each
        row's pending frame into every layer's bank (:mod:`kvpo.models.memory_bank`).

        Args:
            text: the rows' prompts (a ``TextContext`` of 1 or ``len(rows)`` prompts) whose
                cross-attention keys score the frames; None: the cleared query of a prompt
                switch (the recache), which the row's next refresh sees too.
        """
        size = self.policy.bank_size
        if size == 0:
            return
        rows = list(rows)
        for i, row in enumerate(rows):
            bank = self._get(row).bank
            zero, bank.cleared = text is None or bank.cleared, text is None
            if bank.records == 0:
                continue
            before = bank.pages()
            for layer, slots in enumerate(bank.slots):
                scores = None
                if bank.records > size and not zero:
                    text_k = text.for_rows(layer, len(rows))[0][i]
                    pages = torch.tensor(slots, device=self.store.device)
                    frame_k = self.store.kv_pages(layer)[pages, 0]
                    scores = frame_saliency(text_k, frame_k)
                bank.slots[layer] = refresh_layer(slots, bank.pending, bank.records, size, scores)
            self._rehold(bank, before)

    def bank_record(self, rows: Sequence[int], start_frame: int) -> None:
        """After the context pass of the block at ``start_frame``: when the policy records this
        block, its first frame becomes each row's pending bank frame (a page reference)."""
        if not self.policy.records(start_frame):
            return
        for row in rows:
            state = self._get(row)
            page = self._frame_pages(state).get(start_frame)
            if page is None:
                raise IndexError(f"row {row} holds no frame {start_frame} to record in its bank")
            before = state.bank.pages()
            state.bank.pending, state.bank.records = page, state.bank.records + 1
            state.bank.frames[page] = start_frame
            self._rehold(state.bank, before)

    def _new_bank(self) -> BankState | None:
        return BankState.empty(self.store.num_layers) if self.policy.bank_size else None

    def _rehold(self, bank: BankState, before: set[int]) -> None:
        """Page references after a bank change: take the new pages', drop the old ones'."""
        after = bank.pages()
        self.store.allocator.share(sorted(after - before))
        self.store.allocator.release(sorted(before - after))
        bank.frames = {p: f for p, f in bank.frames.items() if p in after}

    def _attended(self, rows, tables, cuts, sparse: Sequence[bool]) -> dict:
        """A view's ``page_table``, ``ctx_lens``, ``layer_tables`` and ``memory`` (the
        :class:`~kvpo.models.frame_cache.PagedContext` fields) from each row's plan pages
        ``tables`` whose first ``cuts`` are sink pages: a row's bank pages go after its sink, or
        for the ``sparse`` rows its sink and bank pages become the candidates of MemFlow's sparse
        memory activation and its table row holds the rest (the window)."""
        banks = [self._get(row).bank for row in rows]
        layers = self.store.num_layers if any(b is not None for b in banks) else 1
        fronts, full = [], []
        for layer in range(layers):
            front, table = [], []
            for pages, cut, bank, selects in zip(tables, cuts, banks, sparse):
                front.append(pages[:cut] + ([] if bank is None else bank.slots[layer]))
                table.append(pages[cut:] if selects else front[-1] + pages[cut:])
            fronts.append(front)
            full.append(table)
        if all(t == full[0] for t in full[1:]):
            full = full[:1]
        size = self.store.page_size  # frames are full pages
        built = [self.store.table_builder.build(t, [len(p) * size for p in t]) for t in full]
        return dict(
            page_table=built[0][0], ctx_lens=built[0][1],
            layer_tables=built if len(built) > 1 else None,
            memory=self._candidates(fronts, sparse) if any(sparse) else None,
        )  # fmt: skip

    def _candidates(self, fronts, sparse) -> SparseMemory:
        """Per layer ``[B_s, N]`` sink and bank pages of the ``sparse`` rows (the same ``N`` for
        every such row)."""
        picked = [i for i, selects in enumerate(sparse) if selects]
        per_layer = [[front[i] for i in picked] for front in fronts]
        if all(t == per_layer[0] for t in per_layer[1:]):
            per_layer = per_layer[:1]
        counts = {len(f) for t in per_layer for f in t}
        if len(counts) > 1:
            raise ValueError(
                f"sparse memory activation needs the same number of sink and bank frames in "
                f"every selecting row of a view, got {sorted(counts)}"
            )
        device = self.store.device
        candidates = [
            torch.tensor(t, dtype=torch.long, device=device).view(len(picked), -1)
            for t in per_layer
        ]
        return SparseMemory(candidates, rows=None if len(picked) == len(sparse) else picked)
