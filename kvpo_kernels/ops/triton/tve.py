"""Triton kernels of the TVE energy (see :mod:`kvpo_kernels.ops.tve`).

Inputs are ``[G, K, A, B, C]`` strided views (:func:`kvpo_kernels.ops.tve.item_views`). Each item
``(g, k)`` of ``N = A * B * C`` elements is cut into chunks of ``CHUNK`` elements; one program per
``(item, chunk)`` work unit. Forward: stage 1 writes one partial sum per work unit, stage 2 sums an
item's partials in chunk order (deterministic, no atomics). Backward: each work unit writes its
chunk of ``2 coef[g, k] (pred - target)`` into contiguous gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 8192
BLOCK = 1024
PARTIALS_BLOCK = 256
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _element_offsets(i, stride_a, stride_b, stride_c, size_b, size_c, CONTIG: tl.constexpr):
    # linear position i of an item -> element offset a * stride_a + b * stride_b + c * stride_c
    if CONTIG:
        offset = i
    else:
        row = i // size_c
        offset = (row // size_b) * stride_a + (row % size_b) * stride_b + (i % size_c) * stride_c
    return offset


@triton.jit
def _item_bases(p, t, n_chunks, items_k, psg, psk, tsg, tsk):
    # work unit -> (item, chunk) and the item's base pointers
    w = tl.program_id(0).to(tl.int64)
    item = w // n_chunks
    chunk = w % n_chunks
    g = item // items_k
    k = item % items_k
    return w, item, chunk, p + g * psg + k * psk, t + g * tsg + k * tsk


@triton.jit
def _sq_sum_partials_kernel(
    p, t, partials, n_chunks, numel, items_k,
    psg, psk, psa, psb, psc, tsg, tsk, tsa, tsb, tsc, size_b, size_c,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, CONTIG: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # partials[w] = sum over the chunk of (p - t)^2, accumulated in ACC
    w, item, chunk, p_item, t_item = _item_bases(p, t, n_chunks, items_k, psg, psk, tsg, tsk)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, tl.minimum(CHUNK, numel - chunk * CHUNK), BLOCK):
        i = chunk * CHUNK + off + tl.arange(0, BLOCK)
        mask = i < numel
        po = _element_offsets(i, psa, psb, psc, size_b, size_c, CONTIG)
        to = _element_offsets(i, tsa, tsb, tsc, size_b, size_c, CONTIG)
        x = tl.load(p_item + po, mask=mask, other=0.0).to(ACC)
        y = tl.load(t_item + to, mask=mask, other=0.0).to(ACC)
        d = x - y
        acc += d * d
    tl.store(partials + w, tl.sum(acc, axis=0))


@triton.jit
def _sum_partials_kernel(partials, out, n_chunks, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # out[item] = sum_j partials[item, j], in a fixed order
    item = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n_chunks, BLOCK):
        j = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + item * n_chunks + j, mask=j < n_chunks, other=0.0)
    tl.store(out + item, tl.sum(acc, axis=0))


@triton.jit
def _backward_kernel(
    p, t, coef, grad_p, grad_t, n_chunks, numel, items_k,
    psg, psk, psa, psb, psc, tsg, tsk, tsa, tsb, tsc, size_b, size_c,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, CONTIG: tl.constexpr, ACC: tl.constexpr,
    WITH_TARGET: tl.constexpr,
):  # fmt: skip
    # grad_p[item, i] = (p - t) * (2 coef[item]) rounded once; grad_t = -grad_p
    w, item, chunk, p_item, t_item = _item_bases(p, t, n_chunks, items_k, psg, psk, tsg, tsk)
    scale = 2 * tl.load(coef + item)
    for off in range(0, tl.minimum(CHUNK, numel - chunk * CHUNK), BLOCK):
        i = chunk * CHUNK + off + tl.arange(0, BLOCK)
        mask = i < numel
        po = _element_offsets(i, psa, psb, psc, size_b, size_c, CONTIG)
        to = _element_offsets(i, tsa, tsb, tsc, size_b, size_c, CONTIG)
        x = tl.load(p_item + po, mask=mask, other=0.0).to(ACC)
        y = tl.load(t_item + to, mask=mask, other=0.0).to(ACC)
        grad = ((x - y) * scale).to(grad_p.dtype.element_ty)
        tl.store(grad_p + item * numel + i, grad, mask=mask)
        if WITH_TARGET:
            tl.store(grad_t + item * numel + i, -grad, mask=mask)


def _launch_args(p: torch.Tensor, t: torch.Tensor):
    groups, items_k, _, size_b, size_c = p.shape
    numel = p[0, 0].numel()
    n_chunks = triton.cdiv(numel, CHUNK)
    contig = all(x.stride(4) == 1 and x.shape[2] * x.shape[3] == 1 for x in (p, t))
    args = (n_chunks, numel, items_k, *p.stride(), *t.stride(), size_b, size_c)
    return groups * items_k * n_chunks, n_chunks, contig, args


def item_sq_sum(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[G, K, A, B, C]`` views -> ``[G, K]`` sums of ``(p - t)^2`` (fp32; fp64 for fp64)."""
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    work, n_chunks, contig, args = _launch_args(p, t)
    partials = torch.empty(work, dtype=acc, device=p.device)
    out = torch.empty(p.shape[:2], dtype=acc, device=p.device)
    _sq_sum_partials_kernel[(work,)](
        p, t, partials, *args, CHUNK=CHUNK, BLOCK=BLOCK, CONTIG=contig, ACC=_TL_ACC[acc]
    )
    _sum_partials_kernel[(out.numel(),)](
        partials, out, n_chunks, BLOCK=PARTIALS_BLOCK, ACC=_TL_ACC[acc]
    )
    return out


def item_sq_sum_backward(
    coef: torch.Tensor, p: torch.Tensor, t: torch.Tensor, with_target: bool
) -> list[torch.Tensor]:
    """``coef [G, K]`` contiguous -> contiguous ``[G, K, N]`` gradients of ``p`` (and ``t``)."""
    work, _, contig, args = _launch_args(p, t)
    grad_p = torch.empty(p.shape[:2] + (p[0, 0].numel(),), dtype=p.dtype, device=p.device)
    grad_t = torch.empty_like(grad_p) if with_target else grad_p
    _backward_kernel[(work,)](
        p, t, coef, grad_p, grad_t, *args,
        CHUNK=CHUNK, BLOCK=BLOCK, CONTIG=contig, ACC=_TL_ACC[coef.dtype], WITH_TARGET=with_target,
    )  # fmt: skip
    return [grad_p, grad_t] if with_target else [grad_p]
