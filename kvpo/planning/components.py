"""Parameter counts and resident bytes of every model a training run keeps on its device.

Everything here is counted from the models' shapes (no weights are read):

- the causal Wan transformer (:class:`~kvpo.models.config.WanConfig`), in the run's dtype except
  the modules diffusers keeps in fp32 (time embedder, modulation tables, the affine norm);
- the LoRA adapter: ``rank x (in + out)`` per wrapped linear, for the trainable adapter
  (``default``), its frozen copy (``old``) and, for a run continuing ``lora_ckpt`` with
  ``kl_reference_initial``, the frozen initial LoRA (``ref``; otherwise the reference is the
  model with adapters disabled, no copy; ``kvpo.training.adapters``);
- umT5-XXL (Wan's text encoder, encoder only), the Wan VAE, and the reward models by name:
  Qwen2-VL-7B (HPSv3), Qwen2-VL-2B (VideoAlign), RAFT (motion rewards). The formulas are checked
  against the transformers / diffusers / kvpo modules built on the meta device in
  ``tests/kvpo/test_memory_plan.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from kvpo.models.config import DEFAULT_TARGETS, WanConfig

TEXT_ONLY = ("attn2.to_k", "attn2.to_v")
"""Block linears applied to the prompt's 512 tokens (once per prompt), not to video tokens."""


def block_linears(model: WanConfig) -> dict[str, tuple[int, int]]:
    """``{name in a block: (in, out)}`` of every linear of one transformer block."""
    d, f = model.dim, model.ffn_dim
    out = {f"attn{a}.{p}": (d, d) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    out["ffn.net.0.proj"] = (d, f)
    out["ffn.net.2"] = (f, d)
    return out


def lora_targets(model: WanConfig, targets: list[str] | tuple[str, ...] | None) -> list[str]:
    """Block linears a LoRA with peft ``target_modules=targets`` wraps (peft's suffix rule:
    a module matches a target equal to its name or ending in ``"." + target``)."""
    targets = list(targets or DEFAULT_TARGETS)
    names = list(block_linears(model))
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def lora_parameters(model: WanConfig, rank: int, targets=None) -> int:
    """Parameters of one LoRA adapter (``A: [r, in]``, ``B: [out, r]`` per wrapped linear)."""
    shapes = block_linears(model)
    per_block = sum(rank * sum(shapes[n]) for n in lora_targets(model, targets))
    return per_block * model.num_layers


def transformer_fp32_parameters(model: WanConfig) -> int:
    """Parameters diffusers keeps in fp32 whatever the dtype (``_keep_in_fp32_modules``): the
    time embedder, each block's ``scale_shift_table`` and affine ``norm2``, the head's table."""
    d = model.dim
    time = (model.freq_dim * d + d) + (d * d + d)
    per_block = 6 * d + (2 * d if model.cross_attn_norm else 0)
    return time + model.num_layers * per_block + 2 * d


def transformer_bytes(model: WanConfig, element_size: int) -> int:
    """Resident bytes of the base transformer: parameters in the run's dtype, the fp32 ones in
    fp32, and the RoPE tables (fp32 cos and sin, ``rope_max_seq_len x head_dim`` each)."""
    fp32 = transformer_fp32_parameters(model)
    rope = 2 * model.rope_max_seq_len * model.attention_head_dim * 4
    return (model.num_parameters() - fp32) * element_size + fp32 * 4 + rope


# ---------------------------------------------------------------------- external models
@dataclass(frozen=True)
class UMT5Shape:
    """umT5 encoder shape (defaults: umT5-XXL, Wan2.1's text encoder)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    relative_attention_num_buckets: int = 32


def umt5_encoder_parameters(s: UMT5Shape = UMT5Shape()) -> int:
    """Parameters of ``UMT5EncoderModel``: shared embedding, per layer self-attention (q, k, v,
    o without bias, its own relative-position bias), gated-GELU FFN (``wi_0``, ``wi_1``,
    ``wo``), two RMS norms; a final norm."""
    inner = s.num_heads * s.d_kv
    layer = (
        4 * s.d_model * inner
        + s.relative_attention_num_buckets * s.num_heads
        + 3 * s.d_model * s.d_ff
        + 2 * s.d_model
    )
    return s.vocab_size * s.d_model + s.num_layers * layer + s.d_model


@dataclass(frozen=True)
class QwenVLShape:
    """Qwen2-VL shape: the language model and the vision tower (defaults: Qwen2-VL-7B)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_mlp_ratio: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2


QWEN2_VL_7B = QwenVLShape()
QWEN2_VL_2B = QwenVLShape(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
)


def qwen2vl_parameters(s: QwenVLShape) -> int:
    """Parameters of transformers' ``Qwen2VLModel`` (no LM head; the reward models drop it)."""
    h, kv = s.hidden_size, s.num_key_value_heads * (s.hidden_size // s.num_attention_heads)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * s.intermediate_size + 2 * h
    text = s.vocab_size * h + s.num_hidden_layers * layer + h
    e, m = s.vision_embed_dim, s.vision_mlp_ratio * s.vision_embed_dim
    block = 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)
    merged = e * s.spatial_merge_size**2
    merger = 2 * e + (merged * merged + merged) + (merged * h + h)
    patch = 3 * s.temporal_patch_size * s.patch_size**2 * e
    return text + patch + s.vision_depth * block + merger


@lru_cache
def wan_vae_parameters() -> int:
    """Parameters of diffusers' ``AutoencoderKLWan`` with its default (Wan2.1) configuration,
    counted on the meta device."""
    import torch
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan()
    return sum(p.numel() for p in vae.parameters())


@lru_cache
def raft_parameters(kind: str = "large") -> int:
    """Parameters of ``kvpo.rewards.raft.RAFT`` (torchvision's layout), on the meta device."""
    import torch

    from kvpo.rewards.raft import RAFT

    with torch.device("meta"):
        model = RAFT(kind)
    return sum(p.numel() for p in model.parameters())
