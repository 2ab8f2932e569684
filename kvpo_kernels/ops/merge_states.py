"""Merging of two attention states over disjoint key sets (cascade attention).

If ``(out_a, lse_a)`` is attention over key set A and ``(out_b, lse_b)`` over a disjoint set B,
attention over A ∪ B is::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

An empty side (``lse = -inf``) contributes nothing; two empty sides give ``out = 0``,
``lse = -inf``. Written in eager differentiable PyTorch (gradients flow to all four inputs and
stay finite for empty sides), so ``torch.compile`` fuses it into one elementwise kernel.
"""

from __future__ import annotations

import torch


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention states over disjoint key sets.

    Args:
        out_a, out_b: ``[B, L, H, D]`` attention outputs (any float dtype, the same for both).
        lse_a, lse_b: ``[B, H, L]`` fp32 natural-log log-sum-exp of the scores (``-inf`` = empty).

    Returns:
        ``out: [B, L, H, D]`` in ``out_a``'s dtype, ``lse: [B, H, L]`` fp32.
    """
    if out_a.shape != out_b.shape or out_a.dim() != 4:
        raise ValueError(
            f"out_a and out_b must both be [B, L, H, D], got {tuple(out_a.shape)} and "
            f"{tuple(out_b.shape)}"
        )
    batch, length, heads, _ = out_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != (batch, heads, length):
            raise ValueError(f"{name} must be [B={batch}, H={heads}, L={length}], got "
                             f"{tuple(lse.shape)}")  # fmt: skip
        if lse.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {lse.dtype}")
    if out_a.dtype != out_b.dtype:
        raise TypeError(f"out_a is {out_a.dtype}, out_b is {out_b.dtype}")
    # max-shifted weights; a shift of 0 where both sides are empty keeps every term finite
    top = torch.maximum(lse_a, lse_b)
    shift = torch.where(torch.isinf(top), 0.0, top)
    w_a, w_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = w_a + w_b
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, 1.0)
    lse = torch.where(nonempty, shift + torch.log(safe_total), float("-inf"))
    scale_a = (w_a / safe_total).transpose(1, 2).unsqueeze(-1)  # [B, L, H, 1]
    scale_b = (w_b / safe_total).transpose(1, 2).unsqueeze(-1)
    out = scale_a * out_a.float() + scale_b * out_b.float()
    return out.to(out_a.dtype), lse
