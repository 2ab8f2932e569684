"""Optimisation pieces of the update: AdamW, the LR schedule, the EMA of the trainable weights."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Warmup (every kind but ``constant``): ``(step + 1) / warmup`` for the first ``warmup`` steps
    (no step runs at LR 0); then 1 (``constant_with_warmup``), a half cosine to 0
    (``cosine``) or a straight line to 0 (``linear``) at ``total`` steps.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_optimizer(
    params: list[torch.nn.Parameter], lr, betas, weight_decay, kind, warmup, total
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind, warmup, total)
    )
    return optimizer, scheduler


class EMA:
    """Exponential moving average of named tensors: ``ema = d * ema + (1 - d) * value``."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        for k, v in named.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.nn.Parameter]) -> None:
        for k, p in params.items():
            p.copy_(self.shadow[k].to(p.dtype))


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients (missing gradients count as 0)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
