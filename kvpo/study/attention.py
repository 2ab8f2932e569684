"""How much attention do the rows put on each cached frame? A hook on the model's attention.

:class:`AttentionMass` is a ``context_hook`` of :class:`kvpo.streaming.StreamingGenerator`: it
wraps the view each block's denoising steps attend through, lets the view attend exactly as
before (the output is the view's own), and measures, per layer and row, the softmax mass of the
queries on each cached frame and on the block's own tokens. With ``lse`` the log-sum-exp of a
query's scores over a set of keys (``kvpo_kernels.routed_attention(..., return_lse=True)``, the
kernel the model attends with), the mass on a subset ``K'`` of all keys ``K`` is
``exp(lse(K') - lse(K))``; it is computed for each cached frame (a one-page table) and for the
block's own keys, then averaged over heads and queries.

Frames are grouped by their role in the block starting at ``f`` (``F`` frames per block, ``m``
nearest frames, sink ``s``): ``sink`` (``< s``), ``nearest`` (``>= f + F - m``), ``self`` (the
block's own tokens) and ``middle``: every other attended frame, i.e. the routed frames ``R_g``
of a routed row, and in the default view the frames a routed view replaces (the ones between the
sink and the nearest frames).
"""

from __future__ import annotations

from collections import defaultdict

import torch

ROLES = ("sink", "middle", "nearest", "self")


class _Observed:
    """A view that attends as ``inner`` does and reports the attention mass to ``record``."""

    def __init__(self, inner, frames: list[list[int]], record) -> None:
        self.inner, self.frames, self.record = inner, frames, record

    @property
    def writes(self) -> bool:
        return self.inner.writes

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        out = self.inner.attend(layer, q, k, v)
        with torch.no_grad():
            self.record(layer, frame_masses(self.inner, layer, q, k, v), self, q, k)
        return out


def frame_masses(view, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``[B, N + 1]`` fp32: mean over heads and queries of the attention mass on each of the
    ``N`` cached frames of ``view`` (a :class:`~kvpo.models.frame_cache.PagedContext`: one page
    per frame, in attention order; 0 past a row's frames) and, last, on the block's own keys."""
    from kvpo_kernels import routed_attention

    pages, table, lens = view.store.kv_pages(layer), view.page_table, view.ctx_lens
    page = view.store.page_size
    kw = {"return_lse": True, "backend": view.backend}
    _, total = routed_attention(q, k, v, pages, table, lens, **kw)
    count = (lens // page).long()
    n = int(count.max()) if count.numel() else 0
    out = torch.zeros(q.shape[0], n + 1, dtype=torch.float32, device=q.device)
    for j in range(n):
        one = torch.where(count > j, page, 0).to(torch.int32)
        _, lse = routed_attention(q, None, None, pages, table[:, j : j + 1].contiguous(), one, **kw)
        out[:, j] = torch.exp(lse - total).mean((1, 2))
    none = torch.zeros_like(lens)
    _, lse = routed_attention(q, k, v, pages, table[:, :1].contiguous(), none, **kw)
    out[:, n] = torch.exp(lse - total).mean((1, 2))
    return out


class AttentionMass:
    """Collects the attention mass per ``(layer, row, role)`` over the blocks of ``frames``.

    Args:
        policy: the cache policy (default views: sink + newest frames).
        sink, nearest: sink frames and ``m`` nearest frames (the routing geometry).
        keep_inputs: keep each layer's last call in :attr:`inputs` (tests): ``{layer: (q, k,
            masses, page_table, ctx_lens, frames)}``.

    Set :attr:`blocks` (block start frames to measure; empty: none) before generating with
    ``stream.context_hook = hook``; :meth:`summary` averages what was measured.
    """

    def __init__(self, policy, sink: int, nearest: int, keep_inputs: bool = False) -> None:
        self.policy, self.sink, self.nearest = policy, sink, nearest
        self.blocks: set[int] = set()
        self.keep_inputs = keep_inputs
        self.inputs: dict[int, tuple] = {}
        self.reset()

    def reset(self) -> None:
        self.sums = defaultdict(float)  # (layer, row, role) -> summed mass
        self.calls = defaultdict(int)  # (layer, row) -> measured calls

    def __call__(self, view, *, start_frame: int, plans=None):
        if start_frame not in self.blocks or view.writes:
            return view
        F = self.policy.frames_per_block
        rows = view.page_table.shape[0]
        frames = [
            list(plans[i])
            if plans is not None and plans[i] is not None
            else self.policy.window(start_frame, F)
            for i in range(rows)
        ]

        def record(layer, masses, observed, q, k):
            self._add(layer, start_frame, masses, observed.frames)
            if self.keep_inputs:
                inner = observed.inner
                self.inputs[layer] = (
                    q.detach().clone(), k.detach().clone(), masses.clone(),
                    inner.page_table.clone(), inner.ctx_lens.clone(), observed.frames,
                )  # fmt: skip

        return _Observed(view, frames, record)

    def role(self, frame: int, block_start: int) -> str:
        F = self.policy.frames_per_block
        if frame < self.sink:
            return "sink"
        if frame >= block_start + F - self.nearest:
            return "nearest"
        return "middle"

    def _add(self, layer: int, block_start: int, masses: torch.Tensor, frames) -> None:
        masses = masses.cpu()
        for row, listed in enumerate(frames):
            self.calls[layer, row] += 1
            self.sums[layer, row, "self"] += float(masses[row, -1])
            for j, frame in enumerate(listed):
                self.sums[layer, row, self.role(frame, block_start)] += float(masses[row, j])

    def summary(self, rows: list[int]) -> dict[str, list[float]]:
        """``{role: [mass per layer]}`` averaged over the measured calls of ``rows``."""
        layers = sorted({layer for layer, _ in self.calls})
        out = {}
        for role in ROLES:
            out[role] = []
            for layer in layers:
                n = sum(self.calls[layer, r] for r in rows)
                total = sum(self.sums[layer, r, role] for r in rows)
                out[role].append(total / n if n else 0.0)
        return out
