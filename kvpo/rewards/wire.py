"""The reward server's wire format: safetensors payloads with JSON metadata.

Request (``POST /<name>``): a safetensors file holding ``videos``, ``[B, T, 3, H, W]`` uint8
(8-bit levels, ``round(255 x)``), with header metadata ``prompts`` (a JSON list of B strings)
and ``metadata`` (the call's metadata as JSON, or ``null``). Response 200: a safetensors file of
one ``[B]`` float32 tensor per component, metadata ``names`` (a JSON list, the scorer's order).
Errors: a JSON object ``{"error": message}`` with a 4xx (the request) or 5xx (the scorer) status.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load, save


class BadRequest(ValueError):
    """A request the server cannot score (answered with 400 and this message)."""


def encode_request(
    videos: torch.Tensor, prompts: Sequence[str], metadata: Mapping[str, Any] | None
) -> bytes:
    """``videos [B, T, 3, H, W]`` in [0, 1] -> request bytes (quantised to 8-bit levels)."""
    levels = (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    try:
        meta = json.dumps(None if metadata is None else dict(metadata))
    except TypeError as err:
        raise TypeError(
            f"reward metadata must be JSON-serialisable to go to a server: {err}"
        ) from err
    return save(
        {"videos": levels.contiguous()}, {"prompts": json.dumps(list(prompts)), "metadata": meta}
    )


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors ``data`` (BadRequest when it is not safetensors)."""
    if len(data) < 8:
        raise BadRequest(f"body of {len(data)} bytes is not a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise BadRequest(
            f"body is not a safetensors file: its first 8 bytes announce a header of {size} "
            f"bytes, the body has {len(data)}"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"safetensors header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise BadRequest("safetensors header is not a JSON object")
    return header.get("__metadata__") or {}


def decode_request(data: bytes) -> tuple[torch.Tensor, list[str], dict | None]:
    """Request bytes -> ``(videos [B, T, 3, H, W] float in [0, 1], prompts, metadata)``; every
    problem is a :class:`BadRequest` naming what was expected and what came."""
    meta = header_metadata(data)
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types
        raise BadRequest(f"body is not a readable safetensors file: {err}") from err
    if set(tensors) != {"videos"}:
        raise BadRequest(f"expected one tensor named 'videos', got {sorted(tensors)}")
    videos = tensors["videos"]
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[2] != 3:
        raise BadRequest(
            f"'videos' must be uint8 [B, T, 3, H, W], got {videos.dtype} {tuple(videos.shape)}"
        )
    try:
        prompts = json.loads(meta["prompts"])
        extra = json.loads(meta.get("metadata", "null"))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise BadRequest(
            f"metadata 'prompts' (a JSON list of strings) is missing or bad: {err}"
        ) from err
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(f"'prompts' must be a JSON list of strings, got {type(prompts).__name__}")
    if len(prompts) != videos.shape[0]:
        raise BadRequest(f"expected {videos.shape[0]} prompts (one per video), got {len(prompts)}")
    if extra is not None and not isinstance(extra, dict):
        raise BadRequest(f"'metadata' must be a JSON object or null, got {type(extra).__name__}")
    return videos.float() / 255, prompts, extra


def encode_scores(scores: Mapping[str, torch.Tensor], names: Sequence[str]) -> bytes:
    tensors = {name: scores[name].detach().float().cpu().contiguous() for name in names}
    return save(tensors, {"names": json.dumps(list(names))})


def decode_scores(data: bytes) -> dict[str, torch.Tensor]:
    """Response bytes -> ``{name: [B] fp32}`` in the server's order."""
    names = json.loads(header_metadata(data)["names"])
    tensors = load(data)
    return {name: tensors[name] for name in names}
