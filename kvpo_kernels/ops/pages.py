"""Batched page copies inside a paged KV pool (the copy half of copy-on-write).

``copy_pages(pages, src, dst)``: ``pages[l, dst[i]] = pages[l, src[i]]`` for every layer ``l``
and every ``i``, in place, on every backend (torch, triton, cpp CPU/CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpo_kernels import registry
from kvpo_kernels.checks import check_ids_in_range, check_index_tensor

OP = "copy_pages"
_BITS_AS_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


@triton.jit
def _copy_pages_kernel(pages, src, dst, stride_layer, stride_page, page_elems, BLOCK: tl.constexpr):
    # pages[layer, dst[i], e] = pages[layer, src[i], e] for e in this program's block
    i = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    base = pages + layer * stride_layer
    src_page = tl.load(src + i).to(tl.int64)
    dst_page = tl.load(dst + i).to(tl.int64)
    vals = tl.load(base + src_page * stride_page + offs, mask=mask)
    tl.store(base + dst_page * stride_page + offs, vals, mask=mask)


@registry.register(OP, "triton")
def _copy_pages_triton(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.numel() == 0:
        return
    flat = pages.view(_BITS_AS_INT[pages.element_size()]).flatten(2)
    if flat.stride(2) != 1:
        raise ValueError("each page of the pool must be contiguous")
    block = 1024
    grid = (src.numel(), flat.shape[0], triton.cdiv(flat.shape[2], block))
    _copy_pages_kernel[grid](
        flat, src, dst, flat.stride(0), flat.stride(1), flat.shape[2], BLOCK=block
    )


@registry.register(OP, "cpp")
def _copy_pages_cpp(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    torch.ops.kvpo_C.copy_pages(pages, src.contiguous(), dst.contiguous())


@torch.library.custom_op("kvpo::copy_pages", mutates_args=("pages",))
def _copy_pages_op(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, backend: str) -> None:
    registry.op(OP).impls[backend](pages, src, dst)


@_copy_pages_op.register_fake
def _(pages, src, dst, backend):
    return None


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
