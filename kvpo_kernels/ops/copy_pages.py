"""Batched page copies inside a paged KV pool (the copy half of copy-on-write).

``copy_pages(pages, src, dst)``: ``pages[l, dst[i]] = pages[l, src[i]]`` for every layer ``l``
and every ``i``, in place, on every backend: torch (here), triton
(:mod:`kvpo_kernels.ops.triton.copy_pages`), cpp CPU/CUDA (``csrc/cpu/pages.cpp``,
``csrc/cuda/pages.cu``).
"""

from __future__ import annotations

import torch

from kvpo_kernels import extension, registry
from kvpo_kernels.checks import check_ids_in_range, check_index_tensor
from kvpo_kernels.ops._registration import backend_op, no_output, triton_kernel

OP = "copy_pages"


def _check(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    if pages.dim() < 2:
        raise ValueError(f"pages must be [L, P, *page_shape], got shape {tuple(pages.shape)}")
    for name, ids in (("src", src), ("dst", dst)):
        check_index_tensor(ids, name, pages.device)
        if ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        check_ids_in_range(ids, name, pages.shape[1])
    if src.numel() != dst.numel():
        raise ValueError(f"src has {src.numel()} page ids, dst has {dst.numel()}")
    if dst.device.type == "cpu" and dst.numel() and not torch.compiler.is_compiling():
        if dst.unique().numel() != dst.numel():
            raise ValueError(f"dst names a page more than once: {dst.tolist()}")
        shared = set(src.tolist()) & set(dst.tolist())
        if shared:
            raise ValueError(f"pages {sorted(shared)} are both copied from and copied to")


@registry.register(OP, "torch")
def _copy_pages_torch(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    pages[:, dst.long()] = pages[:, src.long()]


@registry.register(OP, "cpp")
def _copy_pages_cpp(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    extension.ops().copy_pages(pages, src.contiguous(), dst.contiguous())


registry.register(OP, "triton")(triton_kernel("copy_pages", "copy_pages"))


@backend_op("kvpo::copy_pages", OP, fake=no_output, mutates_args=("pages",))
def _copy_pages_op(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, backend: str) -> None:
    """``pages[:, dst] = pages[:, src]`` on ``backend``."""


def copy_pages(
    pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *, backend: str | None = None
) -> None:
    """Copy whole pages inside a pool, for every layer at once, in place.

    Args:
        pages: ``[L, P, *page_shape]`` pool (any dtype; each page contiguous). A single-layer pool
            ``[P, 2, page_size, H, D]`` is passed as ``pool.unsqueeze(0)``.
        src: ``[N]`` int32 page ids to copy from.
        dst: ``[N]`` int32 page ids to copy to; distinct, and disjoint from ``src``.
        backend: ``"torch" | "triton" | "cpp" | "auto"`` (default: $KVPO_KERNELS_BACKEND or auto).
    """
    _check(pages, src, dst)
    _copy_pages_op(pages, src, dst, registry.resolve(OP, pages.device, backend))
