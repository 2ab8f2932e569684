"""The toy model: the tiny causal Wan plus its text encoder, and the shipped weights.

``kvpo/toy/weights/`` holds ``model.safetensors`` (keys ``transformer.*``: the diffusers
``WanTransformer3DModel`` of :class:`~kvpo.models.causal_wan.CausalWan`; ``text.*``: the
:class:`~kvpo.toy.text.ToyTextEncoder`), ``config.json`` (the :class:`~kvpo.toy.config.ToyConfig`)
and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvpo.models.causal_wan import CausalWan, TextContext
from kvpo.toy.config import TOY, ToyConfig
from kvpo.toy.text import ToyTextEncoder
from kvpo.toy.world import WorldConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"


class ToyModel(nn.Module):
    """``wan``: the causal transformer; ``text``: the prompt encoder feeding its cross-attention."""

    def __init__(self, config: ToyConfig = TOY):
        super().__init__()
        self.config = config
        self.wan = CausalWan.from_config(config.wan)
        self.text = ToyTextEncoder(config.text_dim, config.text_max_len)

    def encode(self, prompts: list[str]) -> TextContext:
        """P segment sentences -> cross-attention K/V of each layer (:class:`TextContext`)."""
        return self.wan.encode_text(self.text(prompts))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat safetensors dict: ``transformer.*`` and ``text.*``."""
        out = {f"transformer.{k}": v for k, v in self.wan.transformer.state_dict().items()}
        out.update({f"text.{k}": v for k, v in self.text.state_dict().items()})
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (strict: every key must match)."""
        parts = {"transformer": {}, "text": {}}
        for key, value in tensors.items():
            head, _, rest = key.partition(".")
            if head not in parts:
                raise KeyError(f"weight {key!r} is neither transformer.* nor text.*")
            parts[head][rest] = value
        self.wan.transformer.load_state_dict(parts["transformer"], strict=True)
        self.text.load_state_dict(parts["text"], strict=True)


def config_to_dict(config: ToyConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> ToyConfig:
    data = dict(data)
    world = WorldConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("world").items()}
    )
    tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
    return ToyConfig(world=world, **{**data, **tuples})


def save_toy_model(model: ToyModel, directory: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.state_tensors(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(config_to_dict(model.config), indent=2) + "\n"
    )


def load_toy_model(directory: str | Path | None = None, device="cpu") -> ToyModel:
    """The toy model from ``directory`` (default: the weights shipped in the package), eval mode."""
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"no toy weights at {weights}; run `python -m kvpo.toy.pretrain` to create them"
        )
    config = config_from_dict(json.loads((directory / "config.json").read_text()))
    model = ToyModel(config)
    model.load_tensors(load_file(str(weights)))
    return model.to(device).eval()
