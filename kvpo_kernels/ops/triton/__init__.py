"""Triton kernels of the ops, one module per op (``kvpo_kernels.ops.triton.<op>``).

These modules import ``triton`` at the top; nothing imports them until the triton backend runs
(see :func:`kvpo_kernels.ops._registration.triton_kernel`), so ``import kvpo_kernels`` needs torch
only. This package itself imports torch only.
"""

from __future__ import annotations

import torch

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_as_int(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the integer type of its element size: copy kernels move bits, any dtype."""
    return t.view(_INT_OF_SIZE[t.element_size()])
