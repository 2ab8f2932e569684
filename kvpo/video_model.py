"""The video model the trainer aligns: causal transformer, prompt encoder and decoder.

:func:`load_video_model` builds it from ``generator_ckpt``:

- empty, or a toy-format directory (``model.safetensors`` + ``config.json``, as
  ``python -m kvpo.toy.pretrain`` writes): the toy model. Its latents are RGB frames in [-1, 1],
  decoding is ``(x + 1) / 2``, one latent frame is one video frame.
- anything else: a Wan checkpoint (:func:`kvpo.models.loading.load_model`: diffusers directory,
  Self-Forcing / LongLive / MemFlow ``.pt`` or ``.safetensors``) with the umT5 text encoder and
  the Wan VAE from ``wan_model_path`` (:mod:`kvpo.models.encoders`, local files only). The VAE
  turns latent frame ``f > 0`` into video frames ``4f - 3 .. 4f`` (frame 0 into frame 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpo.models import CausalWan, TextContext
from kvpo.training.config import TrainConfig
from kvpo.training.validation import is_toy_dir


@dataclass
class VideoModel:
    """What generation needs of a video model.

    ``encode(prompts: list[str]) -> TextContext`` (P prompts; depends on the active adapter),
    ``decode(latents [B, C, T, H, W]) -> videos [B, T_video, 3, H_video, W_video]`` in [0, 1],
    ``video_frame(f)``: the first video frame of latent frame ``f`` (and ``video_frame(T)`` the
    video length), ``latent_shape``: ``(C, H, W)`` of one latent frame.
    """

    wan: CausalWan
    encode: Callable[[list[str]], TextContext]
    decode: Callable[[torch.Tensor], torch.Tensor]
    video_frame: Callable[[int], int]
    latent_shape: tuple[int, int, int]


def _toy_decode(latents: torch.Tensor) -> torch.Tensor:
    return ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


def wan_video_frame(latent_frame: int, stride: int = 4) -> int:
    """First video frame of a latent frame of the Wan VAE (causal, temporal stride 4)."""
    return 0 if latent_frame <= 0 else stride * latent_frame - (stride - 1)


def load_video_model(cfg: TrainConfig, device: torch.device) -> VideoModel:
    """The video model of ``cfg`` on ``device`` (eval mode, base weights frozen)."""
    dtype = cfg.torch_dtype
    if cfg.generator_ckpt is not None and not is_toy_dir(cfg.generator_ckpt):
        return _load_wan(cfg, device, dtype)
    from kvpo.models.causal_wan import cast_transformer
    from kvpo.toy.model import load_toy_model

    toy = load_toy_model(cfg.generator_ckpt, device=device)
    if dtype != torch.float32:
        cast_transformer(toy.wan.transformer, dtype)
    toy.requires_grad_(False)
    return toy_video_model(toy)


def toy_video_model(toy) -> VideoModel:
    """The :class:`VideoModel` of a :class:`~kvpo.toy.model.ToyModel` (RGB latents)."""
    world = toy.config.world
    return VideoModel(
        wan=toy.wan,
        encode=toy.encode,
        decode=_toy_decode,
        video_frame=lambda f: f,
        latent_shape=(toy.config.wan.in_channels, world.height, world.width),
    )


def _load_wan(cfg: TrainConfig, device, dtype) -> VideoModel:
    from kvpo.models import encoders
    from kvpo.models.loading import load_model

    wan = load_model(cfg.generator_ckpt, dtype=dtype, device=device)
    wan.requires_grad_(False)
    text = encoders.WanTextEncoder(cfg.wan_model_path, dtype=dtype, device=device)
    vae = encoders.WanVAE(cfg.wan_model_path, dtype=dtype, device=device)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """One video at a time into one fp32 output: no second copy of all videos."""
        out = None
        for i, row in enumerate(latents):
            video = vae.decode(row[None])[0]  # [3, T, H, W] in the VAE's dtype
            if out is None:
                out = latents.new_empty((len(latents), video.shape[1], 3, *video.shape[2:]),
                                        dtype=torch.float32)  # fmt: skip
            out[i] = ((video.float() + 1) / 2).transpose(0, 1)
        return out

    c = wan.config
    return VideoModel(
        wan=wan,
        encode=lambda p: wan.encode_text(text.encode(p)),
        decode=decode,
        video_frame=wan_video_frame,
        latent_shape=(c.in_channels, c.latent_height, c.latent_width),
    )
