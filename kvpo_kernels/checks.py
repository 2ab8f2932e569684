"""Argument checks shared by the ops: errors that name what was expected and what came."""

from __future__ import annotations

import torch


def check_index_tensor(t: torch.Tensor, name: str, device: torch.device) -> None:
    """``t`` must be an int32 tensor on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_ids_in_range(ids: torch.Tensor, name: str, upper: int, what: str = "pages") -> None:
    """Every entry of ``ids`` must lie in ``[0, upper)``.

    On CPU the first offending entry is reported; on CUDA the check is enqueued with
    ``torch._assert_async`` so that it does not synchronise the device. Under
    ``torch.compile`` (data-dependent checks cannot be traced) it is skipped.
    """
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if ids.device.type == "cpu":
        bad = ((ids < 0) | (ids >= upper)).nonzero()
        if bad.numel():
            where = tuple(bad[0].tolist())
            raise IndexError(
                f"{name}{list(where)} names {int(ids[where])}, the pool has {upper} {what} "
                f"(valid ids 0..{upper - 1})"
            )
    else:
        torch._assert_async(
            ((ids >= 0) & (ids < upper)).all(), f"{name} names ids outside the pool"
        )


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
