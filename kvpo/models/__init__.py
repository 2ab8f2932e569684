"""Causal, cached, routable Wan model on the paged KV store (one latent frame = one page).

API summary (shapes: B rows/branches, C channels, F frames of a block, H x W latent frame,
S denoising steps; the model's dtype is that of its weights)::

    cfg   = WanConfig(...) | WAN_1_3B | tiny_config(...)        # transformer shape + latent size
    model = CausalWan.from_config(cfg, dtype, device)           # or loading.load_model(...)
    text  = model.encode_text(embeds [P, L, text_dim])          # TextContext: per-layer cross K/V
    cache = FrameCache.create(cfg, CachePolicy(sink_size=3, local_attn_size=12,
                              resident_frames=33, frames_per_block=3, recache_size=None),
                              num_pages, dtype=model.dtype, device)
    rows  = cache.new_rows(n) | cache.fork(row, n)              # branches share pages (no copies)
    view  = cache.view(rows, start_frame, F, plans=None | [[frame, ...] | None per row])
    v     = model(latents [B, C, F, H, W], timestep [B] | [B, F] | float (0..1000),
                  text, start_frame, view)                      # velocity, x0 = x_t - sigma * v
    model.write_context(x0 [B, C, F, H, W], text, start_frame,
                        cache.view(rows, start_frame, F, plans, write=True))   # t = 0 pass
    x0, traj = FewStepSampler(FlowSchedule(), rule="x0").denoise_block(
                  model, noise [B, C, F, H, W], text, start_frame, view,
                  renoise [S-1, B|1, C, F, H, W], record=True)  # traj.z, traj.v: [S, B, C, F, H, W]
    gen   = generate(model, cache, rows, text, noise [B|1, C, F_total, H, W], renoise=...,
                     switches={frame: text}, plans=lambda block_start: per-row plans | None,
                     record=True, row_batch=None)               # gen.latents, gen.trajectories
    recache(model, cache, rows, clean_latents, new_text, switch_frame)   # prompt switch
                                         # (kvpo.models.prompt_switch: the authors' recache)

- ``view=None`` in ``model(...)``: the block attends only to itself (one-block forward, equal to
  diffusers' ``WanTransformer3DModel`` on a single block).
- ``plans``: per row, the cached frames to attend in attention order (sink ++ routed ++ nearest
  for KVPO); they must be resident. Default: sink + newest (``local_attn_size`` incl. the block).
- Loading: ``loading.load_model(dir | file | state_dict, config)`` (diffusers directories, original
  Wan / Self-Forcing / LongLive / MemFlow checkpoints); LoRA: ``lora.add_lora``, ``freeze_copy``
  (old policy), ``active_adapter``, ``adapters_disabled`` (reference), ``import_lora``
  (LongLive / MemFlow adapters); local-only umT5 / VAE wrappers in ``encoders``.
- Keys are cached after RoPE at absolute frame positions; frames older than the residency window
  are evicted when the next view is built.
"""

from kvpo.models.cache_policy import CachePolicy
from kvpo.models.causal_wan import BlockContext, CausalWan, TextContext
from kvpo.models.config import WAN_1_3B, WanConfig, tiny_config
from kvpo.models.frame_cache import FrameCache, PagedContext
from kvpo.models.prompt_switch import recache
from kvpo.models.sampler import (
    FewStepSampler,
    FlowSchedule,
    Generation,
    Trajectory,
    generate,
)

__all__ = [
    "WAN_1_3B",
    "BlockContext",
    "CachePolicy",
    "CausalWan",
    "FewStepSampler",
    "FlowSchedule",
    "FrameCache",
    "Generation",
    "PagedContext",
    "TextContext",
    "Trajectory",
    "WanConfig",
    "generate",
    "recache",
    "tiny_config",
]
