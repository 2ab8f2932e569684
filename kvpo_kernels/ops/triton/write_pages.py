"""Triton kernel of :func:`kvpo_kernels.write_pages`: one program per (token, block of its row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpo_kernels.ops.triton import bits_as_int
from kvpo_kernels.ops.write_pages import rows_contiguous, token_rows


@triton.jit
def _write_pages_kernel(
    pages, k, v, slots, page_size, stride_page, stride_kv, stride_token, stride_k, stride_v,
    row_elems, BLOCK: tl.constexpr,
):  # fmt: skip
    # pages[slot // page_size, 0 | 1, slot % page_size, e] = k | v[i, e] for e in this block
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_elems
    slot = tl.load(slots + i).to(tl.int64)
    page = slot // page_size
    row = pages + page * stride_page + (slot - page * page_size) * stride_token
    tl.store(row + offs, tl.load(k + i * stride_k + offs, mask=mask), mask=mask)
    tl.store(row + stride_kv + offs, tl.load(v + i * stride_v + offs, mask=mask), mask=mask)


def write_pages(
    kv_pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """K/V token rows into their slots of one layer's pool (arguments checked by the op)."""
    if slots.numel() == 0:
        return
    _, _, page_size, heads, dim = kv_pages.shape
    if not rows_contiguous(kv_pages):
        raise ValueError(
            f"each token row of kv_pages must be contiguous, strides {kv_pages.stride()}"
        )
    pages = bits_as_int(kv_pages)
    k_rows = bits_as_int(token_rows(k, heads, dim))
    v_rows = bits_as_int(token_rows(v, heads, dim))
    row_elems = heads * dim
    block = min(1024, triton.next_power_of_2(row_elems))
    grid = (slots.numel(), triton.cdiv(row_elems, block))
    _write_pages_kernel[grid](
        pages, k_rows, v_rows, slots.reshape(-1).contiguous(), page_size, pages.stride(0),
        pages.stride(1), pages.stride(2), k_rows.stride(0), v_rows.stride(0), row_elems,
        BLOCK=block,
    )  # fmt: skip
