"""Page tables for paged attention, filled on the host in reused staging buffers.

The model is vLLM's worker ``BlockTable``: a preallocated int32 host buffer with a numpy view is
filled on the host (plain Python and numpy, no tensor ops per row), pinned when the device is
CUDA, and copied to the device with one non-blocking copy per build. The buffer grows (doubles)
when a build needs more room.

Lifetime rule: the *staging* buffers are reused, the *results* never are. Every :meth:`build`
returns new tensors (on CPU a copy of the staging buffer, on CUDA a fresh device tensor the
staging buffer is copied into), so a table stays valid for as long as it is referenced, e.g.
saved by autograd for a backward that runs after many later builds. On CUDA a staging buffer is
refilled only after the event recorded behind its last copy has completed; when none is free
(the host ran ahead of the device) another one is added, so a build never waits on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _Staging:
    """One host buffer of ``numel`` int32 entries, its numpy view and the event of its last copy."""

    def __init__(self, numel: int, pin: bool) -> None:
        self.host = torch.zeros(numel, dtype=torch.int32, pin_memory=pin)
        self.array = self.host.numpy()
        self.copied = None  # torch.cuda.Event recorded after the last copy out of ``host``

    def free(self) -> bool:
        return self.copied is None or self.copied.query()


class PageTableBuilder:
    """Builds ``(page_table [B, W] int32, ctx_lens [B] int32)`` on ``device`` from host lists.

    Args:
        device: where the tables go.
        max_rows, max_pages: initial staging room, grown when a build needs more.

    One build packs the table (row-major, rows padded with page 0) and the context lengths into
    ``B * W + B`` consecutive entries of a staging buffer and moves them in one copy; the
    results are two contiguous views of that one new tensor. See the module docstring for the
    lifetime rule (results are never overwritten by later builds).
    """

    def __init__(
        self, device: torch.device | str = "cpu", max_rows: int = 16, max_pages: int = 64
    ) -> None:
        if max_rows < 1 or max_pages < 1:
            raise ValueError(f"need max_rows, max_pages >= 1, got {max_rows}, {max_pages}")
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._staging = [_Staging(max_rows * (max_pages + 1), self._cuda)]

    @property
    def capacity(self) -> int:
        """int32 entries of the largest staging buffer (a build uses ``B * W + B``)."""
        return max(s.host.numel() for s in self._staging)

    @property
    def num_staging(self) -> int:
        """Staging buffers held (1 on CPU; on CUDA one more per build that outran the device)."""
        return len(self._staging)

    def build(
        self, rows: Sequence[Sequence[int]], ctx_lens: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The page table of ``rows`` and their context lengths, on ``self.device``.

        Args:
            rows: per batch row, its page ids in attention order (ints in int32 range).
            ctx_lens: per batch row, the tokens its pages hold (``len(ctx_lens) == len(rows)``).

        Returns:
            ``page_table``: ``[len(rows), max(1, max_i len(rows[i]))]`` int32, row ``i`` is
            ``rows[i]`` padded with page 0; ``ctx_lens``: ``[len(rows)]`` int32. Both are new
            tensors that no later build touches.
        """
        batch = len(rows)
        if len(ctx_lens) != batch:
            raise ValueError(f"ctx_lens has {len(ctx_lens)} entries for {batch} rows")
        width = max([1] + [len(row) for row in rows])
        cells = batch * width
        staging = self._free_staging(cells + batch)
        table = staging.array[:cells].reshape(batch, width)
        table.fill(0)
        for i, row in enumerate(rows):
            table[i, : len(row)] = row
        staging.array[cells : cells + batch] = ctx_lens
        out = self._copy_out(staging, cells + batch)
        return out[:cells].view(batch, width), out[cells:]

    def _free_staging(self, numel: int) -> _Staging:
        """A staging buffer of at least ``numel`` entries that no pending copy reads."""
        staging = next((s for s in self._staging if s.free()), None)
        if staging is None:
            staging = _Staging(self.capacity, self._cuda)
            self._staging.append(staging)
        if staging.host.numel() < numel:
            grown = _Staging(max(numel, 2 * staging.host.numel()), self._cuda)
            self._staging[self._staging.index(staging)] = grown
            staging = grown
        return staging

    def _copy_out(self, staging: _Staging, numel: int) -> torch.Tensor:
        """A new tensor on ``self.device`` holding the first ``numel`` staged entries."""
        if not self._cuda:
            return staging.host[:numel].clone().to(self.device)
        out = torch.empty(numel, dtype=torch.int32, device=self.device)
        out.copy_(staging.host[:numel], non_blocking=True)
        staging.copied = torch.cuda.Event()
        staging.copied.record(torch.cuda.current_stream(self.device))
        return out
