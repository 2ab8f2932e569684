"""Triton kernel of :func:`kvpo_kernels.copy_pages`: one program per (copy, layer, block)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpo_kernels.ops.triton import bits_as_int


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


def copy_pages(pages: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """``pages[:, dst[i]] = pages[:, src[i]]`` (arguments checked by the op)."""
    if src.numel() == 0:
        return
    flat = bits_as_int(pages).flatten(2)
    if flat.stride(2) != 1:
        raise ValueError("each page of the pool must be contiguous")
    block = 1024
    grid = (src.numel(), flat.shape[0], triton.cdiv(flat.shape[2], block))
    _copy_pages_kernel[grid](
        flat, src, dst, flat.stride(0), flat.stride(1), flat.shape[2], BLOCK=block
    )
