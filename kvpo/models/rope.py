"""3-D rotary position embedding of Wan at absolute frame offsets.

Wan splits each head's ``D`` channels into a time part ``t_dim = D - 2 * (2 * (D // 6))`` and
two spatial parts ``h_dim = w_dim = 2 * (D // 6)``; channel pairs ``(2i, 2i + 1)`` rotate by
``pos * theta^(-2i / dim_part)`` with ``pos`` the token's frame, row or column. A block that starts
at latent frame ``start_frame`` uses time positions ``start_frame .. start_frame + F - 1``, so keys
cached after RoPE keep their absolute positions (Self-Forcing / LongLive).

The tables come from the diffusers ``WanRotaryPosEmbed`` module's buffers (computed in fp64, stored
fp32), so a block at ``start_frame = 0`` gets exactly diffusers' embedding.
"""

from __future__ import annotations

import torch
from torch import nn


def frame_rope(
    rope: nn.Module, start_frame: int, num_frames: int, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin tables of a block of frames.

    Args:
        rope: the diffusers ``WanRotaryPosEmbed`` (``freqs_cos`` / ``freqs_sin``:
            ``[max_seq_len, D]`` fp32, channels repeated pairwise).
        start_frame: absolute latent frame index of the block's first frame.
        num_frames: frames in the block.
        grid: (rows, cols) of patches per frame.

    Returns:
        ``cos, sin``: ``[1, num_frames * rows * cols, 1, D]`` fp32, tokens in (frame, row, col)
        order.
    """
    rows, cols = grid
    max_len = rope.freqs_cos.shape[0]
    last = start_frame + num_frames
    if start_frame < 0 or last > max_len or max(rows, cols) > max_len:
        raise ValueError(
            f"RoPE positions: frames {start_frame}..{last - 1} and a {rows}x{cols} grid need "
            f"rope_max_seq_len >= {max(last, rows, cols)} (and start_frame >= 0); the model has "
            f"{max_len}"
        )
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    tables = []
    for freqs in (rope.freqs_cos, rope.freqs_sin):
        f_t, f_h, f_w = freqs.split(sizes, dim=1)
        shape = (num_frames, rows, cols)
        parts = [
            f_t[start_frame:last].view(num_frames, 1, 1, -1).expand(*shape, -1),
            f_h[:rows].view(1, rows, 1, -1).expand(*shape, -1),
            f_w[:cols].view(1, 1, cols, -1).expand(*shape, -1),
        ]
        tables.append(torch.cat(parts, dim=-1).reshape(1, num_frames * rows * cols, 1, -1))
    return tables[0], tables[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x``.

    Args:
        x: ``[B, L, H, D]`` (any float dtype).
        cos, sin: ``[1, L, 1, D]`` fp32 from :func:`frame_rope`.

    Returns:
        ``[B, L, H, D]`` in ``x``'s dtype: each pair ``(x0, x1)`` becomes
        ``(x0 cos - x1 sin, x0 sin + x1 cos)``, computed in fp32.
    """
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)
