"""The video generator the trainer aligns: causal model, prompt encoder, decoder, prompt sets.

:func:`load_generator` builds it from ``generator_ckpt``:

- empty, or a toy-format directory (``model.safetensors`` + ``config.json``, as
  ``python -m kvpo.toy.pretrain`` writes): the toy model. Its latents are RGB frames in [-1, 1],
  decoding is ``(x + 1) / 2``, one latent frame is one video frame.
- anything else: a Wan checkpoint (:func:`kvpo.models.loading.load_model`: diffusers directory,
  Self-Forcing / LongLive / MemFlow ``.pt`` or ``.safetensors``) with the umT5 text encoder and
  the Wan VAE from ``wan_model_path`` (:mod:`kvpo.models.encoders`, local files only). The VAE
  turns latent frame ``f > 0`` into video frames ``4f - 3 .. 4f`` (frame 0 into frame 0).

Prompts: the toy's train / held-out split, or ``data_path`` (training) and ``eval_data_path``
(held out); without ``eval_data_path`` the last ``eval_prompts`` sequences of ``data_path`` are
held out and training uses the others (the reference code's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kvpo.config import TrainConfig
from kvpo.config_checks import is_toy_dir
from kvpo.distributed import rank_seed
from kvpo.models import CausalWan, TextContext
from kvpo.prompt_file import load_prompt_file


@dataclass
class Generator:
    """What the trainer needs of a generator.

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
    train_prompts: Callable[[int, int], list[str]]
    heldout_prompts: Callable[[int], list[list[str]]]


def _toy_decode(latents: torch.Tensor) -> torch.Tensor:
    return ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


def wan_video_frame(latent_frame: int, stride: int = 4) -> int:
    """First video frame of a latent frame of the Wan VAE (causal, temporal stride 4)."""
    return 0 if latent_frame <= 0 else stride * latent_frame - (stride - 1)


def load_generator(cfg: TrainConfig, device: torch.device) -> Generator:
    """The generator of ``cfg`` on ``device`` (eval mode, base weights frozen)."""
    segments = len(cfg.switch_frames) + 1
    prompts = dict(
        train_prompts=_train_prompts(cfg, segments), heldout_prompts=_heldout_prompts(cfg, segments)
    )
    dtype = getattr(torch, cfg.dtype)
    if cfg.generator_ckpt is not None and not is_toy_dir(cfg.generator_ckpt):
        return _load_wan(cfg, device, dtype, prompts)
    from kvpo.models.causal_wan import cast_transformer
    from kvpo.toy.model import load_toy_model

    toy = load_toy_model(cfg.generator_ckpt, device=device)
    if dtype != torch.float32:
        cast_transformer(toy.wan.transformer, dtype)
    toy.requires_grad_(False)
    world = toy.config.world
    return Generator(
        wan=toy.wan,
        encode=toy.encode,
        decode=_toy_decode,
        video_frame=lambda f: f,
        latent_shape=(toy.config.wan.in_channels, world.height, world.width),
        **prompts,
    )


def _load_wan(cfg: TrainConfig, device, dtype, prompts) -> Generator:
    from kvpo.models import encoders
    from kvpo.models.loading import load_model

    wan = load_model(cfg.generator_ckpt, dtype=dtype, device=device)
    wan.requires_grad_(False)
    text = encoders.WanTextEncoder(cfg.wan_model_path, dtype=dtype, device=device)
    vae = encoders.WanVAE(cfg.wan_model_path, dtype=dtype, device=device)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        videos = [vae.decode(row[None]) for row in latents]  # one video at a time: memory
        return torch.cat([((v.float() + 1) / 2).permute(0, 2, 1, 3, 4) for v in videos])

    c = wan.config
    return Generator(
        wan=wan,
        encode=lambda p: wan.encode_text(text.encode(p)),
        decode=decode,
        video_frame=wan_video_frame,
        latent_shape=(c.in_channels, c.latent_height, c.latent_width),
        **prompts,
    )


def _train_prompts(cfg: TrainConfig, segments: int) -> Callable[[int, int], list[str]]:
    """``prompts(step, rank)``: the training prompt sequence of a group (deterministic)."""
    if cfg.data_path is not None:
        sequences = load_prompt_file(cfg.data_path, segments)
        if cfg.eval_data_path is None and len(sequences) > cfg.eval_prompts:
            sequences = sequences[: len(sequences) - cfg.eval_prompts]  # the rest is held out
        return lambda step, rank: sequences[rank_seed(cfg.seed, rank, step) % len(sequences)]
    from kvpo.toy.prompts import sample_sequence, segment_text

    def toy(step: int, rank: int) -> list[str]:
        rng = np.random.default_rng(rank_seed(cfg.seed, rank, step))
        return [segment_text(s) for s in sample_sequence(rng, segments, "train")]

    return toy


def _heldout_prompts(cfg: TrainConfig, segments: int) -> Callable[[int], list[list[str]]]:
    """``prompts(count)``: ``count`` held-out sequences (0: all of a file, or 16 of the toy's)."""
    if cfg.eval_data_path is not None:
        sequences = load_prompt_file(cfg.eval_data_path, segments)
        return lambda count: sequences[: count or len(sequences)]
    if cfg.data_path is not None:
        sequences = load_prompt_file(cfg.data_path, segments)
        return lambda count: sequences[len(sequences) - (count or len(sequences)) :]
    from kvpo.toy.prompts import heldout_prompts, parse_prompt, segment_text

    def toy(count: int) -> list[list[str]]:
        stories = heldout_prompts(count or 16, num_segments=segments)
        return [[segment_text(s) for s in parse_prompt(story)] for story in stories]

    return toy
