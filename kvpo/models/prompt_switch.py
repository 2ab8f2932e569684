"""Prompt-switch recache (LongLive / MemFlow / KVPO): re-encode the newest frames with the new
prompt.

At a switch to frame ``s`` the frames ``R = policy.recache_frames(s)`` (the last
``local_attn_size``; with ``recache_size`` set, that many) are run again through the model with
the new prompt at the context timestep, and their K/V replace the old entries. This computes
what the authors' ``DiversitySamplingPipeline.recache_after_switch`` computes with
``global_sink: true``; ``policy.recache_rule`` names whose:

- ``"longlive"`` (models/longlive/pipeline/diversity_sampling.py): ``R`` runs in passes of at
  most ``pass_frames`` frames (their ``generator.seq_len // frame_seq_length``: 32760 // 1560 =
  21 frames, ``local_attn_size`` when larger), oldest first, each with ``block_mask = None``;
- ``"memflow"`` (models/memflow/pipeline/diversity_sampling.py): ``R`` (``min(local_attn_size,
  s)`` frames, every frame before ``s`` with global attention) runs in one pass. Their pass
  builds a block-causal ``block_mask`` and passes ``is_recache=True``, but the cached branch of
  ``CausalWanSelfAttention.forward`` (models/memflow/wan/modules/causal_model.py) never applies
  the mask (``attention(roped_query, k_cat, v_cat)``), and ``is_recache`` only makes the pass
  read the whole bank (``is_update_bank = False``); ``update_bank=False``: nothing is recorded.

In both, a pass ``[a, b)``:

- attends, from every query, to the sink frames and the newest ``local_attn_size - sink_size``
  frames ending at ``b`` (all frames before ``b`` with global attention), the pass's own frames
  among them (not block-causal: a frame also attends to later frames of its pass), plus
  MemFlow's bank (``k_cat = [k_sink, k_bank, k_local]``);
- keeps the sink's K/V from the first prompt (their ``is_recompute`` write start
  ``max(local_start_index, sink_tokens)``) unless the pass starts at frame 0 (a switch at or
  before ``local_attn_size``), which re-encodes the sink too;
- uses RoPE at the frames' absolute indices, the timestep ``context_timestep`` and the clean
  latents (no noise is added here);
- frames older than ``R`` keep their entries.

With MemFlow's bank, the bank is refreshed first with a cleared prompt query (their
cross-attention cache is zeroed before the pass and again after it) and every pass attends to
all of it (with sparse memory activation, to each head's selection for the pass's mean query:
the pass's view is not a routed one). Queries of frames whose K/V are not written (sink frames
in a pass not starting at 0) change nothing and are not run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpo.models.cache_policy import CachePolicy
from kvpo.models.causal_wan import CausalWan, TextContext
from kvpo.models.frame_cache import FrameCache

PASS_FRAMES = 21
"""Frames per recache pass in the authors' code: ``seq_len`` 32760 tokens of 1560 per frame."""


def pass_frames(policy: CachePolicy) -> int:
    """Frames one LongLive recache pass runs: their wrapper's ``seq_len`` is ``1560 *
    local_attn_size`` when ``local_attn_size > 21``, else 32760 tokens (21 frames)."""
    return max(PASS_FRAMES, policy.local_attn_size)


def pass_ranges(policy: CachePolicy, switch_frame: int) -> list[tuple[int, int]]:
    """The passes of the recache at ``switch_frame``: ``(lo, hi)``, the frames ``[lo, hi)``
    each pass writes, oldest first: over ``policy.recache_frames``, LongLive's passes of
    :func:`pass_frames` frames or MemFlow's one pass (``policy.recache_rule``); a pass not
    starting at 0 skips the sink frames, which keep the first prompt's K/V; a pass left with no
    frame is not run."""
    frames = policy.recache_frames(switch_frame)
    step = len(frames) if policy.recache_rule == "memflow" else pass_frames(policy)
    out = []
    for a in range(frames.start, frames.stop, max(step, 1)):
        b = min(a + step, frames.stop)
        lo = a if a == 0 else max(a, policy.sink_size)  # the sink is kept unless a == 0
        if lo < b:
            out.append((lo, b))
    return out


def pass_keys(policy: CachePolicy, lo: int, hi: int) -> tuple[list[int], list[int]]:
    """What the queries of the pass writing frames ``[lo, hi)`` attend to.

    Returns:
        ``(cached, own)``: frames read from the cache (written before this pass), ascending, and
        frames of ``[lo, hi)`` whose new K/V the pass attends to, ascending.
    """
    sink = policy.sink_size
    if policy.local_attn_size == -1:
        keys = list(range(hi))
    else:
        newest = max(sink, hi - (policy.local_attn_size - sink))
        keys = list(range(min(sink, hi))) + list(range(newest, hi))
    return [f for f in keys if f < lo], [f for f in keys if f >= lo]


@torch.no_grad()
def recache(
    model: CausalWan,
    cache: FrameCache,
    rows: Sequence[int],
    latents: torch.Tensor,
    text: TextContext,
    switch_frame: int,
    context_timestep: float = 0.0,
) -> range:
    """Re-encode the recache frames before ``switch_frame`` with the new prompt (module
    docstring).

    Args:
        latents: ``[B | 1, C, len(R) or more, H, W]`` clean latents ending at ``switch_frame``
            (the last ``len(R)`` frames are used).
        text: the new prompt's context (1 or ``len(rows)`` prompts).

    Returns:
        The re-encoded frame range ``R`` (sink frames in it are rewritten only when ``R``
        starts at 0).
    """
    policy = cache.policy
    frames = policy.recache_frames(switch_frame)
    if len(frames) == 0:
        return frames
    if latents.shape[2] < len(frames):
        raise ValueError(
            f"recache at frame {switch_frame} re-encodes frames {frames.start}..{frames.stop - 1} "
            f"but latents hold only {latents.shape[2]} frames"
        )
    rows = list(rows)
    window = latents[:, :, latents.shape[2] - len(frames) :]
    window = window.expand(len(rows), *window.shape[1:])
    per_frame = model.config.tokens_per_frame
    cache.bank_refresh(rows, None)  # MemFlow: the switch cleared the prompt query
    for lo, b in pass_ranges(policy, switch_frame):
        cached, own = pass_keys(policy, lo, b)
        view = cache.view(rows, lo, b - lo, plans=[cached] * len(rows), write=True, routed=False)
        tokens = torch.tensor(own, device=model.device) - lo
        view.block_keys = (
            tokens[:, None] * per_frame + torch.arange(per_frame, device=model.device)
        ).flatten()
        block = window[:, :, lo - frames.start : b - frames.start]
        model.write_context(block, text, lo, view, timestep=context_timestep)
    return frames
