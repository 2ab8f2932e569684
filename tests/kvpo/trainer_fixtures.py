"""A tiny random-weight toy generator and trainer config for the trainer's tests.

Independent of the shipped weights: a 1-layer model on 16x16 frames (16 tokens per frame),
12-frame videos with one prompt switch, 2 denoising steps. Routing still has a real pool:
sink 1, window 6, m = 3 nearest, n_random = 2, resident 12 frames, P = 1 block.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvpo.training.config import TrainConfig
from kvpo.training.config_parse import load_config

TINY_OVERRIDES = [
    "streaming_max_length=12",
    "streaming_chunk_size=6",
    "streaming_min_new_frame=3",
    "switch_frame_indices=6",
    "model_kwargs.local_attn_size=6",
    "model_kwargs.sink_size=1",
    "slice_last_frames=6",
    "m_nearest_frames=3",
    "perturb_num_blocks=1",
    "denoising_step_list=[1000, 500]",
    "log_prob_grad_steps=1",
    "K=3",
    "adapter.rank=4",
    "lr=1e-2",
    "eval_prompts=2",
    "eval_seeds=1",
    "max_train_steps=2",
    "show_progress=false",
    "device=cpu",
]


def tiny_generator_dir(directory: Path) -> Path:
    """Write random toy-format weights (model.safetensors + config.json) into ``directory``."""
    from kvpo.toy.config import ToyConfig
    from kvpo.toy.model import ToyModel, save_toy_model
    from kvpo.toy.world import WorldConfig

    config = ToyConfig(
        world=WorldConfig(height=16, width=16),
        num_attention_heads=1,
        attention_head_dim=16,
        num_layers=1,
        ffn_dim=32,
        text_dim=16,
    )
    torch.manual_seed(0)
    model = ToyModel(config)
    with torch.no_grad():  # diffusers zero-initialises the output head; make outputs non-trivial
        model.wan.transformer.proj_out.weight.normal_(std=0.2)
    save_toy_model(model, directory)
    return directory


def tiny_config(weights: Path, run_dir: Path, *extra: str) -> TrainConfig:
    return load_config(
        None,
        [*TINY_OVERRIDES, f"generator_ckpt={weights}", f"output_dir={run_dir}", *extra],
    )


def tiny_args(weights: Path, run_dir: Path, *extra: str) -> list[str]:
    """Command-line overrides for ``kvpo.train.main``."""
    return [*TINY_OVERRIDES, f"generator_ckpt={weights}", f"output_dir={run_dir}", *extra]
