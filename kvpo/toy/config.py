"""The toy run's geometry in one object: world, model shape, cache, routing and sampler.

:data:`TOY` is what ``python -m kvpo.toy.pretrain``, ``python -m kvpo.sample`` and the trainer's
default run read. The method's LongLive values are scaled down for 2 CPU cores:

| quantity | LongLive (docs/method.md) | toy |
| --- | --- | --- |
| latent frame | 16 x 60 x 104, 1560 tokens | RGB 3 x 32 x 32 in [-1, 1], no VAE; patch 1x4x4: 64 |
| model | Wan2.1-1.3B, 30 layers, 12 x 128 | 4 layers, 3 heads x 32 (dim 96), FFN 192, text_dim 32 |
| block | 3 frames | 3 frames |
| attended frames | 12 = 3 sink + 9 newest | 9 = 3 sink + 6 newest (current block included) |
| resident cache | 33 frames | 24 frames (the whole default video) |
| routing | m = 4 nearest, 5 random older | m = 4 nearest, 2 random older (pool: 5+ frames) |
| fork | >= 12 frames of history, P = 5 blocks | >= 9 frames of history (block 3 on), P = 2 blocks |
| video | 147+ frames, switches at 39, 75, 111 | 24 frames (8 blocks), switches at frames 9 and 15 |
| sampler | t = 1000, 750, 500, 250, shift 5 | same t, shift 1: sigma = 1, .75, .5, .25 |
| update rule | x0 re-noising (distilled models) | Euler ODE steps (see below) |

The toy model is a plain flow-matching model, not distilled: with the x0 re-noising rule its
samples score less than half of the Euler rule's held-out rewards (model card), so the toy
samples with the deterministic Euler rule of the same sampler (``sampler_rule``; set it to
``"x0"`` to compare). KVPO's branches stay deterministic functions of their routing plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpo.models.cache_policy import CachePolicy
from kvpo.models.config import WanConfig, tiny_config
from kvpo.toy.world import WorldConfig


@dataclass(frozen=True)
class ToyConfig:
    """Everything fixed about the toy world, its model and its default video layout."""

    world: WorldConfig = field(default_factory=WorldConfig)
    num_attention_heads: int = 3
    attention_head_dim: int = 32
    num_layers: int = 4
    ffn_dim: int = 192
    text_dim: int = 32
    text_max_len: int = 8
    frames_per_block: int = 3
    num_blocks: int = 8
    sink_size: int = 3
    local_attn_size: int = 9
    resident_frames: int = 24
    switch_frames: tuple[int, ...] = (9, 15)
    m_nearest_frames: int = 4
    perturb_num_blocks: int = 2
    min_history_frames: int = 9
    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)
    timestep_shift: float = 1.0
    sampler_rule: str = "euler"
    context_noise: int = 0

    @property
    def wan(self) -> WanConfig:
        """Shape of the causal model (latent frames are the RGB frames)."""
        return tiny_config(
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            num_layers=self.num_layers,
            ffn_dim=self.ffn_dim,
            text_dim=self.text_dim,
            freq_dim=32,
            latent_height=self.world.height,
            latent_width=self.world.width,
        )

    @property
    def cache_policy(self) -> CachePolicy:
        return CachePolicy(
            sink_size=self.sink_size,
            local_attn_size=self.local_attn_size,
            resident_frames=self.resident_frames,
            frames_per_block=self.frames_per_block,
        )

    @property
    def num_frames(self) -> int:
        return self.num_blocks * self.frames_per_block

    @property
    def sigmas(self) -> list[float]:
        """Sampler noise levels: ``s = t / 1000``, ``sigma = shift s / (1 + (shift - 1) s)``."""
        shift = self.timestep_shift
        return [shift * (t / 1000) / (1 + (shift - 1) * t / 1000) for t in self.denoising_step_list]

    def trainer_defaults(self) -> dict:
        """The toy run's values under :class:`kvpo.training.config.TrainConfig` key names."""
        return {
            "denoising_step_list": list(self.denoising_step_list),
            "num_frame_per_block": self.frames_per_block,
            "context_noise": self.context_noise,
            "model_kwargs": {
                "local_attn_size": self.local_attn_size,
                "sink_size": self.sink_size,
                "timestep_shift": self.timestep_shift,
            },
            "slice_last_frames": self.resident_frames - self.local_attn_size,
            "streaming_max_length": self.num_frames,
            "switch_frame_indices": ", ".join(str(f) for f in self.switch_frames),
            "m_nearest_frames": self.m_nearest_frames,
            "perturb_num_blocks": self.perturb_num_blocks,
        }


TOY = ToyConfig()
