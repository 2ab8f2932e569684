"""Model configuration: the diffusers ``WanTransformer3DModel`` hyper-parameters plus latent size.

A :class:`WanConfig` fixes everything the causal model needs to know about its geometry: the
transformer's shape (as passed to ``WanTransformer3DModel``) and the latent frame size, from which
the tokens per frame (= the paged store's ``page_size``) follow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

DEFAULT_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
"""LoRA targets by default: every linear of every transformer block (LongLive's choice: all
``nn.Linear`` in the blocks; names inside a ``WanTransformerBlock``)."""


@dataclass(frozen=True)
class WanConfig:
    """Shape of a causal Wan model.

    The transformer fields carry the names of ``WanTransformer3DModel``'s arguments
    (``num_attention_heads``, ``attention_head_dim``, ...), so ``transformer_kwargs()`` builds the
    diffusers module and ``from_diffusers_config`` reads a diffusers ``config.json``.
    ``latent_height`` / ``latent_width`` are the latent frame size the model generates.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    latent_height: int = 60
    latent_width: int = 104

    def __post_init__(self) -> None:
        p_t, p_h, p_w = self.patch_size
        if p_t != 1:
            raise ValueError(
                f"patch_size[0] must be 1 (one latent frame = one page of tokens), got {p_t}"
            )
        if self.latent_height % p_h or self.latent_width % p_w:
            raise ValueError(
                f"latent frame {self.latent_height}x{self.latent_width} is not divisible by the "
                f"spatial patch {p_h}x{p_w}"
            )
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even, got {self.attention_head_dim}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def dim(self) -> int:
        """Hidden size: heads x head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one latent frame after patching (Wan2.1 at 480x832: 1560)."""
        _, p_h, p_w = self.patch_size
        return (self.latent_height // p_h) * (self.latent_width // p_w)

    @property
    def frame_grid(self) -> tuple[int, int]:
        """(rows, cols) of patches in one latent frame."""
        _, p_h, p_w = self.patch_size
        return self.latent_height // p_h, self.latent_width // p_w

    def kv_bytes_per_frame(self, element_size: int = 2) -> int:
        """Bytes of K and V of one latent frame over all layers."""
        return 2 * self.num_layers * self.tokens_per_frame * self.dim * element_size

    def transformer_kwargs(self) -> dict:
        """Arguments of ``diffusers.WanTransformer3DModel`` for this shape (text-to-video)."""
        return dict(
            patch_size=self.patch_size,
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=self.cross_attn_norm,
            qk_norm="rms_norm_across_heads",
            eps=self.eps,
            rope_max_seq_len=self.rope_max_seq_len,
        )

    @classmethod
    def from_diffusers_config(
        cls, config: dict, latent_height: int = 60, latent_width: int = 104
    ) -> WanConfig:
        """From a diffusers ``config.json`` dict of ``WanTransformer3DModel``.

        Image-conditioning models (``image_dim`` / ``added_kv_proj_dim`` set) are not supported.
        """
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if config.get(key) is not None:
                raise ValueError(
                    f"config has {key}={config[key]!r}: only text-to-video Wan models are "
                    "supported (expected None)"
                )
        if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(
                f"qk_norm must be 'rms_norm_across_heads', got {config.get('qk_norm')!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs, latent_height=latent_height, latent_width=latent_width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown WanConfig keys {unknown}; known keys: {sorted(names)}")
        data = dict(data)
        if "patch_size" in data:
            data["patch_size"] = tuple(data["patch_size"])
        return cls(**data)

    def num_parameters(self) -> int:
        """Parameter count of the transformer (text-to-video, with the text projection)."""
        d, f, p = self.dim, self.ffn_dim, math.prod(self.patch_size)
        attn = 4 * (d * d + d) + 2 * d
        block = 2 * attn + 2 * d + (d * f + f) + (f * d + d) + 6 * d
        embed = self.in_channels * p * d + d
        cond = (self.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
        text = (self.text_dim * d + d) + (d * d + d)
        head = d * self.out_channels * p + self.out_channels * p + 2 * d
        return embed + cond + text + self.num_layers * block + head


WAN_1_3B = WanConfig()
"""Wan2.1-T2V-1.3B at 480x832 (latent 60x104, 1560 tokens per frame): Self-Forcing, LongLive,
MemFlow."""


def tiny_config(**overrides) -> WanConfig:
    """A CPU-sized model: 32x32 latent frames of 3 channels, patch 1x4x4 -> 64 tokens per frame."""
    base = dict(
        patch_size=(1, 4, 4),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=3,
        out_channels=3,
        text_dim=32,
        freq_dim=32,
        ffn_dim=128,
        num_layers=2,
        latent_height=32,
        latent_width=32,
    )
    base.update(overrides)
    return WanConfig(**base)
