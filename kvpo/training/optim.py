"""Optimisation pieces of the update: AdamW, the LR schedule (diffusers'), the EMA of the trainable
weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

# diffusers' schedule names (``diffusers.optimization.SchedulerType``) offered: the ones the KVPO
# authors' config lists. diffusers' ``polynomial`` and ``cosine_with_restarts`` need their power /
# cycles and ``piecewise_constant`` its step rules, which have no config key here.
SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int
) -> LambdaLR:
    """diffusers' LR schedule ``kind`` for a run of ``total`` training steps, its step 0 done.

    The schedule is ``diffusers.optimization.get_scheduler(kind, optimizer, warmup, total + 1)``
    built as if resumed after its step 0 (``last_epoch=0``): training step ``s`` (0-based) runs
    at diffusers' factor of step ``s + 1``, and the caller steps the scheduler once at the end of
    every training step. Diffusers' step 0 is 0 in warmup (``constant_with_warmup``: ``k /
    warmup`` at step ``k``), so a loop that starts at it, as the KVPO authors' does, makes its
    first training step's updates at LR 0; here the first runs at ``lr / warmup`` and the LR is
    full from step ``warmup - 1`` on. The one extra step in the length keeps the decaying kinds
    (``linear``, ``cosine``, ...) above 0 at the last step ``total - 1``, where diffusers' own
    step ``total`` would be 0 (docs/reference-differences.md, "Step counting and learning rate").
    """
    if kind not in SCHEDULES:
        raise ValueError(
            f"lr_scheduler must be one of {SCHEDULES} (diffusers.optimization.get_scheduler "
            f"names; its polynomial, cosine_with_restarts and piecewise_constant are not offered), "
            f"got {kind!r}"
        )
    for group in optimizer.param_groups:  # what a LambdaLR resumed at last_epoch >= 0 reads
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler(
        kind, optimizer, num_warmup_steps=warmup, num_training_steps=total + 1, last_epoch=0
    )


def build_optimizer(
    params: list[torch.nn.Parameter], lr, betas, weight_decay, kind, warmup, total
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over ``params`` and its LR schedule (:func:`build_scheduler`: ``kind``, ``warmup``
    and ``total`` counted in training steps)."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return optimizer, build_scheduler(optimizer, kind, warmup, total)


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
