"""Qwen2-VL inputs as the reward models' inference code builds them, without its processor.

Pixels (qwen-vl-utils and transformers 4.45's ``Qwen2VLImageProcessor``, which the released
reward models ran on): frames are taken as 8-bit levels (``round(255 x)``), resized to a
multiple of 28 per side (:func:`smart_resize`), rescaled by 1/255, normalised with the CLIP
mean and std, and cut into 14 x 14 patches of 2 frames (an image is its frame twice), ordered
for the 2 x 2 patch merger: ``[t, h / 28, w / 28, 2, 2]`` patches of ``[3, 2, 14, 14]`` values
each (:func:`patchify`). The LLM sees one ``<|image_pad|>`` / ``<|video_pad|>`` token per merged
2 x 2 patch group.

Text: the checkpoint's chat template renders one user turn of the visual placeholder then the
prompt, with the generation prompt (:func:`chat_text`); :func:`encode` tokenises, repeats the
placeholder token once per merged patch group and right-pads with the pad token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE  # 28
RESCALE = 0.00392156862745098  # 1 / 255 as the processors store it


def smart_resize(
    height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR
) -> tuple[int, int]:
    """qwen-vl-utils' size rule: each side a multiple of ``factor`` (Python rounding), the area
    brought into ``[min_pixels, max_pixels]`` keeping the aspect ratio as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height} x {width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def levels(frames: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` in [0, 1] -> fp32 8-bit levels 0..255 (``round(255 x)``)."""
    return (frames.float() * 255).round().clamp(0, 255)


def grayscale(frames: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` of 8-bit frames, 3 channels:
    ``trunc(0.2989 R + 0.587 G + 0.114 B)`` in every channel. ``[..., 3, H, W]`` levels."""
    r, g, b = frames.unbind(-3)
    gray = (0.2989 * r + 0.587 * g + 0.114 * b).trunc()
    return gray.unsqueeze(-3).expand(frames.shape).contiguous()


def resize_levels(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's tensor resize of 8-bit frames ``[N, 3, H, W]``: bicubic with antialiasing
    in fp32, clamped to 0..255 and rounded; unchanged when the size is already ``size``."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    out = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 255).round()


def patchify(frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised patches of 8-bit frames ``[T, 3, h, w]`` (T a multiple of 2, h and w of 28):
    ``([T / 2 * h / 14 * w / 14, 3 * 2 * 14 * 14] fp32, (T / 2, h / 14, w / 14))``."""
    t, c, h, w = frames.shape
    if t % TEMPORAL or h % FACTOR or w % FACTOR:
        raise ValueError(f"patchify needs T % 2 == 0 and H, W multiples of 28, got {frames.shape}")
    mean = torch.tensor(CLIP_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames.device).view(1, 3, 1, 1)
    x = (frames.float() * RESCALE - mean) / std
    gt, gh, gw = t // TEMPORAL, h // PATCH, w // PATCH
    x = x.reshape(gt, TEMPORAL, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, bh, bw, mh, mw | c, tt, ph, pw
    return x.reshape(gt * gh * gw, c * TEMPORAL * PATCH * PATCH), (gt, gh, gw)


def chat_text(tokenizer, template: str, kind: str, text: str) -> str:
    """One user turn (a ``kind`` = "image" or "video" item, then ``text``) rendered by the chat
    ``template`` with the assistant's generation prompt."""
    content = [{"type": kind, kind: "in memory"}, {"type": "text", "text": text}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )


def encode(
    tokenizer, texts: Sequence[str], placeholder: int, counts: Sequence[int], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L])``: each text tokenised, its one
    ``placeholder`` token repeated ``counts[b]`` times, right-padded with ``pad``."""
    rows = []
    for text, count in zip(texts, counts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(placeholder) != 1:
            raise ValueError(
                f"the rendered prompt must hold the visual placeholder token {placeholder} once, "
                f"found {ids.count(placeholder)} in {text[:200]!r}"
            )
        at = ids.index(placeholder)
        rows.append(ids[:at] + [placeholder] * count + ids[at + 1 :])
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return input_ids, mask
