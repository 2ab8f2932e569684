"""The video generator the trainer aligns: causal model, prompt encoder, decoder, prompt sets.

:func:`load_generator` builds it from ``generator_ckpt``: the toy model shipped in
``kvpo/toy/weights`` when empty, or a toy-format directory (``model.safetensors`` +
``config.json``, as ``python -m kvpo.toy.pretrain`` writes). Latents of the toy model are RGB
frames in [-1, 1], so decoding is ``(x + 1) / 2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvpo.config import ConfigError, TrainConfig
from kvpo.distributed import rank_seed
from kvpo.models import CausalWan, TextContext
from kvpo.prompt_file import load_prompt_file


@dataclass
class Generator:
    """What the trainer needs of a generator.

    ``encode(prompts: list[str]) -> TextContext`` (P prompts; depends on the active adapter),
    ``decode(latents [B, C, T, H, W]) -> videos [B, T, 3, H, W]`` in [0, 1],
    ``latent_shape``: ``(C, H, W)`` of one latent frame.
    """

    wan: CausalWan
    encode: Callable[[list[str]], TextContext]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, int, int]
    train_prompts: Callable[[int, int], list[str]]
    heldout_prompts: Callable[[int], list[list[str]]]


def _toy_decode(latents: torch.Tensor) -> torch.Tensor:
    return ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


def load_generator(cfg: TrainConfig, device: torch.device) -> Generator:
    """The generator of ``cfg`` on ``device`` (eval mode, base weights frozen)."""
    from kvpo.toy.model import load_toy_model

    source = cfg.generator_ckpt
    if source is not None and not (Path(source) / "config.json").is_file():
        raise ConfigError(
            f"generator_ckpt={source!r} is not a toy-format directory (model.safetensors + "
            "config.json); loading Wan checkpoints for training needs their text encoder and "
            "VAE wrappers, which kvpo.models does not provide yet"
        )
    toy = load_toy_model(source, device=device)
    dtype = getattr(torch, cfg.dtype)
    if dtype != torch.float32:
        from kvpo.models.causal_wan import cast_transformer

        cast_transformer(toy.wan.transformer, dtype)
    toy.requires_grad_(False)
    world = toy.config.world
    segments = len(cfg.switch_frames) + 1
    return Generator(
        wan=toy.wan,
        encode=toy.encode,
        decode=_toy_decode,
        latent_shape=(toy.config.wan.in_channels, world.height, world.width),
        train_prompts=_train_prompts(cfg, segments),
        heldout_prompts=_heldout_prompts(cfg, segments),
    )


def _train_prompts(cfg: TrainConfig, segments: int) -> Callable[[int, int], list[str]]:
    """``prompts(step, rank)``: the training prompt sequence of a group (deterministic)."""
    if cfg.data_path is not None:
        sequences = load_prompt_file(cfg.data_path, segments)
        return lambda step, rank: sequences[rank_seed(cfg.seed, rank, step) % len(sequences)]
    from kvpo.toy.prompts import sample_sequence, segment_text

    def toy(step: int, rank: int) -> list[str]:
        rng = np.random.default_rng(rank_seed(cfg.seed, rank, step))
        return [segment_text(s) for s in sample_sequence(rng, segments, "train")]

    return toy


def _heldout_prompts(cfg: TrainConfig, segments: int) -> Callable[[int], list[list[str]]]:
    """``prompts(count)``: the first ``count`` held-out sequences (0: all of a file, or 16)."""
    if cfg.eval_data_path is not None:
        sequences = load_prompt_file(cfg.eval_data_path, segments)
        return lambda count: sequences[: count or len(sequences)]
    from kvpo.toy.prompts import heldout_prompts, parse_prompt, segment_text

    def toy(count: int) -> list[list[str]]:
        stories = heldout_prompts(count or 16, num_segments=segments)
        return [[segment_text(s) for s in parse_prompt(story)] for story in stories]

    return toy
