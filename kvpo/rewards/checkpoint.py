"""Reading released reward checkpoints: tensor files, key layouts, LoRA merging, strict checks.

The Qwen2-VL reward models were saved with transformers 4.45 (``visual.*``, ``model.layers.*``,
``lm_head.*``, plus their heads ``rm_head.*``), VideoAlign's through PEFT (``base_model.model.``
prefix, LoRA factors beside each adapted linear layer). :func:`qwen2vl_state` brings either, or a
transformers-5 save (``model.visual.*``, ``model.language_model.*``), to the keys of
transformers 5's ``Qwen2VLModel`` (``visual.*``, ``language_model.*``) plus the head's; the LM
head is dropped (rewards read hidden states).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B, BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer."


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (``.safetensors``, or a torch pickle of tensors loaded with
    ``weights_only``; a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def merge_lora(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """PEFT LoRA factors folded into their base weights: ``W + scale * B @ A`` (in fp32, stored
    back in ``W``'s dtype); ``X.base_layer.weight`` / ``.bias`` become ``X.weight`` / ``.bias``."""
    out, used = {}, set()
    for key, value in state.items():
        if key.endswith(LORA_A) or key.endswith(LORA_B):
            continue
        if BASE not in key:
            out[key] = value
            continue
        stem, _, leaf = key.partition(BASE)
        if leaf == "weight" and stem + LORA_A in state:
            a, b = state[stem + LORA_A].float(), state[stem + LORA_B].float()
            value = (value.float() + scale * (b @ a)).to(value.dtype)
            used.update((stem + LORA_A, stem + LORA_B))
        out[f"{stem}.{leaf}"] = value
    stray = sorted(k for k in state if (k.endswith(LORA_A) or k.endswith(LORA_B)) and k not in used)
    if stray:
        raise ValueError(f"LoRA factors without a base layer: {stray[:8]}")
    return out


def qwen2vl_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a Qwen2-VL reward checkpoint (after :func:`merge_lora`) in transformers 5's
    ``Qwen2VLModel`` layout; ``rm_head.*`` kept, ``lm_head.*`` dropped."""
    new_layout = any(k.startswith("model.language_model.") for k in state)
    out = {}
    for key, value in state.items():
        key = key.removeprefix(PEFT_PREFIX)
        if key.startswith("lm_head."):
            continue
        if new_layout and key.startswith("model."):
            key = key.removeprefix("model.")
        elif key.startswith("model."):
            key = "language_model." + key.removeprefix("model.")
        if key in out:
            raise ValueError(f"two checkpoint keys map to {key!r}")
        out[key] = value
    return out


def check_state(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped keys of ``found``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{what} do not match the model ({len(expected)} tensors expected, "
                 f"{len(found)} found)"]  # fmt: skip
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > 8 else ""
                parts.append(f"{label}: " + ", ".join(items[:8]) + more)
        raise ValueError("; ".join(parts))


def describe(path: Path) -> str:
    """What is at ``path``, for error messages: a file, a directory and its first entries, or
    nothing."""
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        return f"a directory {path} holding {names[:12]}" + (" ..." if len(names) > 12 else "")
    if path.is_file():
        return f"a file {path}"
    return f"nothing at {path}"
