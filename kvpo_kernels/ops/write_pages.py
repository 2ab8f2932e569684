"""Scatter of new K/V tokens into the slots of one layer's paged pool (the write half of append).

``write_pages(kv_pages, k, v, slots)``: for every token ``n``, with ``page = slots[n] // page_size``
and ``offset = slots[n] % page_size``: ``kv_pages[page, 0, offset] = k[n]`` and
``kv_pages[page, 1, offset] = v[n]``, in place, on every backend: torch (here), triton
(:mod:`kvpo_kernels.ops.triton.write_pages`), cpp CPU/CUDA (``csrc/cpu/pages.cpp``,
``csrc/cuda/pages.cu``).
Slot ids are int64 (``page_id * page_size + offset`` overflows int32 for pools past 2^31 tokens);
every address is computed in int64.
"""

from __future__ import annotations

import torch

from kvpo_kernels import extension, registry
from kvpo_kernels.checks import check_ids_in_range, check_same_device
from kvpo_kernels.ops._registration import backend_op, no_output, triton_kernel

OP = "write_pages"


def _check(kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    if kv_pages.dim() != 5 or kv_pages.shape[1] != 2:
        raise ValueError(
            f"kv_pages must be [P, 2, page_size, H, D], got shape {tuple(kv_pages.shape)}"
        )
    num_pages, _, page_size, heads, dim = kv_pages.shape
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != kv_pages.dtype:
            raise TypeError(f"{name} is {t.dtype}, the pool is {kv_pages.dtype}")
        check_same_device(name, t, kv_pages.device)
        if t.dim() < 3 or tuple(t.shape[-2:]) != (heads, dim):
            raise ValueError(
                f"{name} must be [..., H={heads}, D={dim}] like the pool, got {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)}, v has {tuple(v.shape)}")
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots must be a torch.Tensor, got {type(slots).__name__}")
    if slots.dtype != torch.int64:
        raise TypeError(f"slots must be int64, got {slots.dtype}")
    check_same_device("slots", slots, kv_pages.device)
    if tuple(slots.shape) != tuple(k.shape[:-2]):
        raise ValueError(
            f"slots must have k's leading shape {tuple(k.shape[:-2])}, got {tuple(slots.shape)}"
        )
    check_ids_in_range(slots, "slots", num_pages * page_size, what="slots")
    if slots.device.type == "cpu" and slots.numel() and not torch.compiler.is_compiling():
        unique, counts = slots.flatten().unique(return_counts=True)
        if unique.numel() != slots.numel():
            raise ValueError(f"slots name a slot more than once: {unique[counts > 1].tolist()}")


@registry.register(OP, "torch")
def _write_pages_torch(
    kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    page_size, heads, dim = kv_pages.shape[2:]
    flat = slots.reshape(-1)
    page, offset = flat // page_size, flat % page_size
    kv_pages[page, 0, offset] = k.reshape(-1, heads, dim)
    kv_pages[page, 1, offset] = v.reshape(-1, heads, dim)


def rows_contiguous(t: torch.Tensor) -> bool:
    """Whether each ``[H, D]`` row of ``t`` (``[..., H, D]``) is one contiguous run."""
    heads, dim = t.shape[-2:]
    return (dim == 1 or t.stride(-1) == 1) and (heads == 1 or t.stride(-2) == dim)


def token_rows(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """``t`` as ``[N, H, D]`` with each ``[H, D]`` row contiguous (a view when it can be)."""
    rows = t.reshape(-1, heads, dim)
    return rows if rows_contiguous(rows) else rows.contiguous()


registry.register(OP, "triton")(triton_kernel("write_pages", "write_pages"))


@registry.register(OP, "cpp")
def _write_pages_cpp(
    kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    heads, dim = kv_pages.shape[3:]
    extension.ops().write_pages(
        kv_pages,
        token_rows(k, heads, dim),
        token_rows(v, heads, dim),
        slots.reshape(-1).contiguous(),
    )


@backend_op("kvpo::write_pages", OP, fake=no_output, mutates_args=("kv_pages",))
def _write_pages_op(
    kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, backend: str
) -> None:
    """K/V rows into their slots of ``kv_pages`` on ``backend``."""


def write_pages(
    kv_pages: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Write K/V tokens into their slots of one layer's pool, in place.

    Args:
        kv_pages: ``[P, 2, page_size, H, D]`` one layer's pool (index 0 = K, 1 = V), any float
            dtype; each token row ``[H, D]`` contiguous (``PagedKVStore.kv_pages(layer)`` is).
        k, v: ``[N, H, D]`` or ``[B, T, H, D]`` new tokens, the pool's dtype and device.
        slots: int64, ``[N]`` or ``[B, T]`` (k's leading shape): ``page_id * page_size + offset``,
            distinct, each in ``[0, P * page_size)``.
        backend: ``"torch" | "triton" | "cpp" | "auto"`` (default: $KVPO_KERNELS_BACKEND or auto).
    """
    _check(kv_pages, k, v, slots)
    _write_pages_op(kv_pages, k, v, slots, registry.resolve(OP, kv_pages.device, backend))
