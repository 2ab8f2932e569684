"""MemFlow's memory bank: per row and per layer, which recorded frames (pages) are attended.

MemFlow (their ``models/memflow/wan/modules/causal_model.py``: ``CausalWanModel.
_apply_cache_updates``, ``_apply_cache_updates_before``, ``compress_kv_bank``, and
``CausalWanSelfAttention.forward``; ``pipeline/streaming_training.py``:
``generate_chunk_with_cache``) keeps, besides the sink and the local window, a bank of
``bank_size`` frames of K/V per layer:

- **record**: the context pass of a block starting at a multiple of ``F * record_interval``
  frames keeps its *first* frame's K/V (RoPE at its absolute position) as the *pending* frame;
  ``records`` counts them.
- **refresh** (their ``q_bank``: the first denoising step of every block, and the prompt-switch
  recache) moves the pending frame into every layer's bank. With ``n = records``:
  ``n <= bank_size``: slot ``n - 1`` holds it; ``n > bank_size``: the layer keeps its
  ``bank_size - 1`` most salient frames, most salient first, and appends the pending one. The
  refresh repeats at every block while ``n > bank_size``, with the same pending frame (their
  code does; the pending frame can then hold two slots).
- **saliency** of a bank frame for a row and layer: the mean of ``q . k / sqrt(D)`` over the
  row's prompt tokens ``q`` (the layer's cross-attention keys, all ``L_text`` tokens), the heads
  and the frame's tokens ``k`` (its cached self-attention keys), i.e.
  ``mean_h(mean_j q_jh . mean_t k_th) / sqrt(D)``. Their cross-attention cache is cleared at a
  prompt switch and filled again by the next block's first cross-attention, after that block's
  refresh: the recache's refresh and the next block's see a zero query, every score 0; their
  ``torch.topk`` order among ties is unspecified, here the lowest slots are kept.
- **read**: every attention of the block (denoising steps, context pass, recache) attends to the
  layer's bank frames next to the sink and window (``sink ++ bank ++ window``; routed views
  ``bank ++ routed ++ nearest``).

Here a bank slot is a page id of the paged store: recording or selecting a frame takes a page
reference (the page outlives the row's own release of that frame); no K/V is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class BankState:
    """One row's bank. ``slots[layer]``: page ids in bank order; ``pending``: the last recorded
    frame's page (None before the first record); ``records``: frames recorded so far;
    ``cleared``: the row's prompt query is cleared until the next refresh (a switch)."""

    slots: list[list[int]]
    pending: int | None = None
    records: int = 0
    cleared: bool = False
    frames: dict[int, int] = field(default_factory=dict)  # page id -> recorded frame

    @classmethod
    def empty(cls, num_layers: int) -> BankState:
        return cls([[] for _ in range(num_layers)])

    def pages(self) -> set[int]:
        """Distinct pages the bank holds (one reference each)."""
        held = {p for slots in self.slots for p in slots}
        return held | ({self.pending} if self.pending is not None else set())

    def copy(self) -> BankState:
        return BankState(
            [list(s) for s in self.slots], self.pending, self.records, self.cleared,
            dict(self.frames),
        )  # fmt: skip

    def layer_frames(self, layer: int) -> list[int]:
        """The frames (absolute indices) in ``layer``'s slots, in bank order."""
        return [self.frames[p] for p in self.slots[layer]]


def frame_saliency(text_k: torch.Tensor, frame_k: torch.Tensor) -> torch.Tensor:
    """MemFlow's saliency of bank frames (``compress_kv_bank``), float32.

    Args:
        text_k: ``[L_text, H, D]`` the layer's cross-attention keys of the row's prompt.
        frame_k: ``[n, T, H, D]`` the cached keys of ``n`` bank frames of ``T`` tokens.

    Returns:
        ``[n]``: ``mean_h(mean_j text_k[j, h] . mean_t frame_k[i, t, h]) / sqrt(D)``.
    """
    if text_k.dim() != 3 or frame_k.dim() != 4 or text_k.shape[1:] != frame_k.shape[2:]:
        raise ValueError(
            f"need text_k [L, H, D] and frame_k [n, T, H, D] with equal H, D, got "
            f"{tuple(text_k.shape)} and {tuple(frame_k.shape)}"
        )
    q = text_k.float().mean(0)  # [H, D]
    k = frame_k.float().mean(1)  # [n, H, D]
    return (k * q).sum(-1).mean(-1) / math.sqrt(text_k.shape[-1])


def keep_salient(slots: Sequence[int], scores: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` slots of highest score, highest first; ties keep the lower slot first."""
    order = sorted(range(len(slots)), key=lambda i: (-float(scores[i]), i))
    return [slots[i] for i in order[:keep]]


def refresh_layer(
    slots: list[int], pending: int, records: int, bank_size: int, scores: torch.Tensor | None
) -> list[int]:
    """One layer's bank after the pending frame is applied (module docstring).

    ``scores``: ``[len(slots)]`` saliency of the current slots (needed when
    ``records > bank_size``; None: a cleared query, every score 0).
    """
    if records <= bank_size:
        if len(slots) < records - 1:
            raise ValueError(
                f"bank has {len(slots)} slots after {records} records: a record was never "
                "refreshed into the bank (refresh before every block)"
            )
        return list(slots[: records - 1]) + [pending]
    if scores is None:
        scores = torch.zeros(len(slots))
    return keep_salient(slots, scores, bank_size - 1) + [pending]
