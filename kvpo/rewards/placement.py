"""Where a reward model's weights live between calls, and in what dtype they compute.

A scorer is built on the CPU. :meth:`Placement.on` moves it to the device of the videos it scores
(each rank scores on its own device: rank-local) for the duration of one call; with ``offload``
it goes back to the CPU afterwards, so a large scorer costs no device memory while the policy
trains (``reward_offload``); without, it stays where it was last used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, default_gpu: torch.dtype) -> torch.dtype:
    """``dtype`` as a torch dtype; None or "auto": ``default_gpu`` when CUDA is present, else
    float32 (bf16 matmuls on a CPU are slow and round more than the CPU tests allow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default_gpu if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


class Placement:
    """Moves ``module`` to the scoring device for one call (see the module docstring)."""

    def __init__(self, module: nn.Module, offload: bool = False):
        self.module, self.offload = module, bool(offload)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @contextmanager
    def on(self, device: torch.device | str) -> Iterator[nn.Module]:
        device = torch.device(device)
        if self.device != device:
            self.module.to(device)
        try:
            yield self.module
        finally:
            if self.offload and self.device.type != "cpu":
                self.module.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def batches(count: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(count)`` of ``size`` items (``size <= 0``: one slice)."""
    step = size if size > 0 else max(count, 1)
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))
