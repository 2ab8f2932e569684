"""MemFlow's sparse memory activation (SMA): per head, a block attends to only the ``top_k``
sink and bank frames most relevant to its mean query.

Their code (``models/memflow/wan/modules/causal_model.py``: ``CausalWanSelfAttention.forward``
with ``SMA=True``, ``dynamic_topk_routing_attention(query, k_sink ++ k_bank, chunk_size=1560,
top_k=3)``), in every layer and every cached attention that is not a perturbed (routed) window:
the denoising steps, the context pass and the prompt-switch recache:

- **candidates**: the sink frames and the layer's visible bank frames, one frame each
  (``chunk_size`` 1560 tokens is one latent frame);
- **score** of candidate frame ``c`` for head ``h``: ``phi_q[h] . phi_k[c, h]`` (no scale), with
  ``phi_q`` the mean of the block's RoPE'd queries over all its tokens and ``phi_k[c]`` the mean
  of the frame's cached (RoPE'd) keys over its tokens;
- **selection**: per row and head, the ``min(top_k, candidates)`` frames of highest score
  (``torch.topk``), ascending in candidate order; the head attends to them, the local window
  and the block (``k_global ++ k_local``). With at most ``top_k`` candidates every candidate is
  kept (SMA changes nothing).

Here the selected frames' K/V are gathered per head (``top_k`` pages of each row and head: a
copy of ``top_k`` frames, the only K/V this copies) and prepended to the block's own keys, so
``kvpo_kernels.routed_attention`` (any backend; its page table cannot differ per head) reads the
window through the row's page table and the selection as part of its dense new keys. The
descriptors and scores are computed in float32 (theirs in the model's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SMA_TOP_K = 3
"""Frames each head keeps (their ``top_k=3``)."""


def select_frames(q: torch.Tensor, frame_k: torch.Tensor, top_k: int = SMA_TOP_K) -> torch.Tensor:
    """Indices of the candidate frames each head of each row attends to.

    Args:
        q: ``[B, L, H, D]`` the block's RoPE'd queries.
        frame_k: ``[B, N, T, H, D]`` the cached keys of ``N`` candidate frames of ``T`` tokens.

    Returns:
        ``[B, H, min(top_k, N)]`` long, ascending: the frames of highest
        ``mean_l q[l, h] . mean_t frame_k[n, t, h]``.
    """
    if q.dim() != 4 or frame_k.dim() != 5 or q.shape[0] != frame_k.shape[0]:
        raise ValueError(
            f"need q [B, L, H, D] and frame_k [B, N, T, H, D] of equal B, got "
            f"{tuple(q.shape)} and {tuple(frame_k.shape)}"
        )
    if q.shape[2:] != frame_k.shape[3:]:
        raise ValueError(
            f"q has {q.shape[2]} heads of {q.shape[3]}, frame_k {frame_k.shape[3]} of "
            f"{frame_k.shape[4]}: sparse memory activation scores each query head against its "
            "own key head"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    phi_q = q.float().mean(1)  # [B, H, D]
    phi_k = frame_k.float().mean(2)  # [B, N, H, D]
    scores = torch.einsum("bhd,bnhd->bhn", phi_q, phi_k)
    top = torch.topk(scores, min(top_k, frame_k.shape[1]), dim=-1).indices
    return top.sort(dim=-1).values


@dataclass
class SparseMemory:
    """The sink and bank pages a view's heads choose from (:func:`select_frames`).

    ``candidates``: per layer ``[B_s, N]`` long page ids in candidate order (sink, then the
    layer's bank) of the ``B_s`` selecting rows, or one tensor for every layer; ``rows``: the
    view's rows that select, ascending (None: all of them).
    """

    candidates: list[torch.Tensor]
    rows: list[int] | None = None
    top_k: int = SMA_TOP_K

    def selected_kv(
        self, layer: int, q: torch.Tensor, kv_pages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K/V of the frames each head of ``layer`` selects for the queries ``q``.

        Args:
            q: ``[B, L, H, D]`` the block's RoPE'd queries.
            kv_pages: ``[P, 2, T, H, D]`` the layer's page pool.

        Returns:
            ``k, v: [B, k * T, H, D]`` (head ``h`` holds its own ``k`` frames, in selection
            order), None when there is no candidate.
        """
        pages = self.candidates[layer if len(self.candidates) > 1 else 0]
        batch, count = pages.shape
        if count == 0:
            return None
        if batch != q.shape[0]:
            raise ValueError(f"candidates of {batch} rows for queries of {q.shape[0]} rows")
        _, _, frame, heads, dim = kv_pages.shape
        chosen = select_frames(q, kv_pages[pages, 0], self.top_k)  # [B, H, k]
        page = pages.gather(1, chosen.flatten(1)).view_as(chosen)
        t = torch.arange(frame, device=kv_pages.device)
        h = torch.arange(heads, device=kv_pages.device)
        kv = kv_pages[page[..., None], :, t, h[:, None, None]]  # [B, H, k, T, 2, D]
        kv = kv.permute(4, 0, 2, 3, 1, 5).reshape(2, batch, -1, heads, dim)
        return kv[0], kv[1]

    def attend(self, layer, q, k, v, kv_pages, page_table, ctx_lens, backend=None):
        """Routed attention of a view's rows, the selecting rows also attending to their heads'
        selected frames (prepended to the block's keys, :meth:`selected_kv`).

        ``q: [B, L, H, D]``, ``k, v: [B, L_k, H, D]`` the block's; ``page_table [B, N]`` and
        ``ctx_lens [B]`` the layer's (the window only for the selecting rows) ->
        ``[B, L, H, D]``. The other rows (routed rows of the same batch) run in a second call.
        """
        from kvpo_kernels import routed_attention

        def run(index, select):
            qi, ki, vi, table, lens = q, k, v, page_table, ctx_lens
            if index is not None:
                qi, ki, vi, table, lens = (x[index] for x in (q, k, v, page_table, ctx_lens))
            chosen = self.selected_kv(layer, qi, kv_pages) if select else None
            if chosen is not None:
                ki, vi = torch.cat([chosen[0], ki], dim=1), torch.cat([chosen[1], vi], dim=1)
            return routed_attention(qi, ki, vi, kv_pages, table, lens, backend=backend)

        if self.rows is None:
            return run(None, True)
        picked = torch.tensor(self.rows, dtype=torch.long, device=q.device)
        others = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        others[picked] = False
        others = others.nonzero().flatten()
        out = torch.cat([run(picked, True), run(others, False)])
        return out[torch.cat([picked, others]).argsort()]
