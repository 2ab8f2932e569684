"""Triton kernels of routed attention (FlashAttention-2 style), forward and backward.

Keys are visited in blocks of ``BLOCK_N`` tokens of the row's sequence ``cached ++ new``; every
token looks up its own page (``page_table[b, t // page_size]``, slot ``t % page_size``), so page
boundaries need not align with blocks. Addresses are int64. The head dim is padded to a power of
two with masked loads (odd head dims work). Scores are in log2 units: ``s = q.k * scale * log2 e``.

- forward, one program per (query block, row, head): online softmax over all keys -> out, lse;
- backward: ``delta = rowsum(dO * O) - dlse``; dQ per (query block, row, head) over all keys;
  dK/dV of the new tokens per (new-token block, row, kv head) over every query of the kv head's
  query heads (cached tokens get no gradient, so theirs are never formed).

fp16/bf16 dots run on tensor cores. fp32 dots run in ieee precision (exact FMAs on CUDA cores,
no tensor cores; slow, and every configuration spills registers) unless PyTorch allows TF32 for
fp32 CUDA matmuls (:func:`fp32_precision`). Autotune configs whose shared memory cannot fit the
device are pruned per dtype, head dim and precision (:func:`shared_memory_bound`).
``python -m kvpo_kernels.aot_check`` compiles every configuration for sm_80 and sm_90 without a
GPU and checks both (docs/triton-resources.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpo_kernels.registry import TRITON_INTERPRET

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _configs(block_m, block_n):
    if TRITON_INTERPRET:  # one small config: the interpreter runs numpy per block
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_m
        for n in block_n
        for w, s in ((4, 2), (8, 3))
    ]


# --- autotune pruning: configs whose shared memory cannot fit the device are never tried ------


def shared_memory_bound(
    kernel: str,
    *,
    elem_bytes: int,
    precision: str,
    capability: int,
    block_d: int,
    block_m: int,
    block_n: int,
    num_stages: int,
) -> int:
    """An upper bound on the shared memory (bytes) of ``kernel`` compiled with these parameters
    for a GPU of compute capability ``capability`` (``10 * major + minor``).

    A program keeps in shared memory the ``[*, BLOCK_D]`` tiles it loads once (q; q and dO; k and
    v in dK/dV), buffers of the tiles streamed through its loop (k and v; q and dO in dK/dV) and
    ``[BLOCK_M, BLOCK_N]`` probability tiles on their way into a dot. Buffers: 2 in the forward
    and dQ loops, ``num_stages - 1`` in the dK/dV loop, one more where tensor-core dots are
    pipelined with wgmma (sm_90 and later), 3 in the forward and dQ loops of fp32 dots in ieee
    precision (FMA, no tensor cores). fp32 inputs count two probability tiles. Fitted to every
    configuration compiled for sm_80 and sm_90 by ``python -m kvpo_kernels.aot_check``, which
    fails if a compiled kernel ever exceeds it.
    """
    fma = elem_bytes == 4 and precision == "ieee"
    extra = 1 if capability >= 90 and not fma else 0
    if kernel == "_dkdv_kernel":
        once, streamed, buffers = 2 * block_n, 2 * block_m, max(1, num_stages - 1) + extra
    else:
        once = block_m if kernel == "_forward_kernel" else 2 * block_m
        streamed, buffers = 2 * block_n, (3 if fma else 2) + extra
    tiles = (1 if elem_bytes == 2 else 2) * block_m * block_n
    return elem_bytes * (block_d * (once + buffers * streamed) + tiles) + 1024


def _device_limits(device: torch.device) -> tuple[int, int]:
    """``(compute capability 10 * major + minor, bytes of shared memory a block may use)`` of a
    CUDA device: the limit Triton's launcher checks a compiled kernel against."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return 10 * major + minor, props["max_shared_mem"]


def _prune(kernel: str) -> dict:
    """``prune_configs_by`` of ``kernel``: the configs whose :func:`shared_memory_bound` fits the
    device, for the launch's dtype, head dim and precision (the autotune key has all three: Triton
    adds the tensors' dtypes). Should none fit, the smallest is kept and its launch reports the
    shortage (Triton's ``OutOfResources``).

    fp32 dots in ieee precision are FMA loops whose tiles live in registers: every configuration
    spills, and with 4 warps 2 to 20 times the bytes of the same tiles with 8 warps (and compiles
    2 to 3 times slower), so only the 8-warp configs are tried for them.
    """

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        capability, limit = _device_limits(q.device)
        if q.element_size() == 4 and kwargs["PRECISION"] == "ieee":
            configs = [c for c in configs if c.num_warps == 8] or configs

        def bound(config):
            return shared_memory_bound(
                kernel,
                elem_bytes=q.element_size(),
                precision=kwargs["PRECISION"],
                capability=capability,
                block_d=kwargs["BLOCK_D"],
                block_m=config.kwargs["BLOCK_M"],
                block_n=config.kwargs["BLOCK_N"],
                num_stages=config.num_stages,
            )

        return [c for c in configs if bound(c) <= limit] or [min(configs, key=bound)]

    return {"early_config_prune": prune}


_KEY = ["BLOCK_D", "GROUP", "PRECISION"]


@triton.jit
def _key_block(Pages, KNew, VNew, table_row, ctx, total, start, k_new_row, v_new_row,
               stride_kn_l, stride_vn_l, stride_page, stride_kv, stride_slot, kv_head_offset,
               page_size, offs_d, d_mask, BLOCK_N: tl.constexpr):  # fmt: skip
    # keys/values [BLOCK_N, BLOCK_D] of tokens start .. start + BLOCK_N - 1 of the row: cached
    # tokens through their pages, new tokens from k_new/v_new (two predicated loads, one per
    # source; a lane loads from at most one of them)
    t = start + tl.arange(0, BLOCK_N)
    valid = t < total
    cached = t < ctx
    page = tl.load(table_row + t // page_size, mask=cached, other=0).to(tl.int64)
    slot = (t % page_size).to(tl.int64)
    k_cached = Pages + page * stride_page + slot * stride_slot + kv_head_offset
    new = tl.where(cached, 0, t - ctx).to(tl.int64)
    from_pages = cached[:, None] & d_mask[None, :]
    from_new = (valid & ~cached)[:, None] & d_mask[None, :]
    k = tl.load(k_cached[:, None] + offs_d[None, :], mask=from_pages, other=0.0)
    k += tl.load(KNew + k_new_row + new[:, None] * stride_kn_l + offs_d[None, :], mask=from_new,
                 other=0.0)  # fmt: skip
    v = tl.load(k_cached[:, None] + stride_kv + offs_d[None, :], mask=from_pages, other=0.0)
    v += tl.load(VNew + v_new_row + new[:, None] * stride_vn_l + offs_d[None, :], mask=from_new,
                 other=0.0)  # fmt: skip
    return k, v, valid


@triton.autotune(
    configs=_configs((64, 128), (32, 64)), key=_KEY, prune_configs_by=_prune("_forward_kernel")
)
@triton.jit
def _forward_kernel(Q, KNew, VNew, Pages, Table, CtxLens, Out, Lse,
                    stride_qb, stride_ql, stride_qh, stride_knb, stride_knl, stride_knh,
                    stride_vnb, stride_vnl, stride_vnh, stride_ob, stride_ol, stride_oh,
                    stride_page, stride_kv, stride_slot, stride_table,
                    Lq, Ln, H, page_size, D, qk_scale,
                    GROUP: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kv_head = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < Lq
    q_ptr = Q + b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_ql + h * stride_qh
    q = tl.load(q_ptr + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    ctx = tl.load(CtxLens + b)
    total = ctx + Ln
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, total, BLOCK_N):
        k, v, valid = _key_block(
            Pages, KNew, VNew, Table + b * stride_table, ctx, total, start,
            b * stride_knb + kv_head * stride_knh, b * stride_vnb + kv_head * stride_vnh,
            stride_knl, stride_vnl, stride_page, stride_kv, stride_slot, kv_head * D,
            page_size, offs_d, d_mask, BLOCK_N,
        )  # fmt: skip
        # s = q k^T (log2 units); m' = max(m, rowmax s); p = 2^(s - m'); l = l 2^(m - m') + sum p
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))  # fmt: skip
    o_ptr = Out + b * stride_ob + offs_m.to(tl.int64)[:, None] * stride_ol + h * stride_oh
    tl.store(o_ptr + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])  # fmt: skip
    tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_mask)


@triton.jit
def _delta_kernel(Out, DOut, DLse, Delta, stride_b, stride_l, stride_h, Lq, H, D,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    # delta[b, h, i] = sum_d dO * O - dlse
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    at = b * stride_b + offs_m.to(tl.int64)[:, None] * stride_l + h * stride_h + offs_d[None, :]
    o = tl.load(Out + at, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + at, mask=mask, other=0.0).to(tl.float32)
    row = bh.to(tl.int64) * Lq + offs_m
    dlse = tl.load(DLse + row, mask=offs_m < Lq, other=0.0)
    tl.store(Delta + row, tl.sum(o * do, 1) - dlse, mask=offs_m < Lq)


@triton.autotune(
    configs=_configs((64, 128), (32, 64)), key=_KEY, prune_configs_by=_prune("_dq_kernel")
)
@triton.jit
def _dq_kernel(Q, KNew, VNew, Pages, Table, CtxLens, DOut, Lse, Delta, DQ,
               stride_qb, stride_ql, stride_qh, stride_knb, stride_knl, stride_knh,
               stride_vnb, stride_vnl, stride_vnh,
               stride_page, stride_kv, stride_slot, stride_table,
               Lq, Ln, H, page_size, D, qk_scale, scale,
               GROUP: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # dQ = scale sum_blocks dS K,  dS = P (dO V^T - delta),  P = 2^(s - lse log2 e)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kv_head = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < Lq
    row_mask = m_mask[:, None] & d_mask[None, :]
    at = b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_ql + h * stride_qh + offs_d[None, :]
    q = tl.load(Q + at, mask=row_mask, other=0.0)
    do = tl.load(DOut + at, mask=row_mask, other=0.0)
    row = bh.to(tl.int64) * Lq + offs_m
    lse2 = tl.load(Lse + row, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=m_mask, other=0.0)
    ctx = tl.load(CtxLens + b)
    total = ctx + Ln
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, total, BLOCK_N):
        k, v, valid = _key_block(
            Pages, KNew, VNew, Table + b * stride_table, ctx, total, start,
            b * stride_knb + kv_head * stride_knh, b * stride_vnb + kv_head * stride_vnh,
            stride_knl, stride_vnl, stride_page, stride_kv, stride_slot, kv_head * D,
            page_size, offs_d, d_mask, BLOCK_N,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + at, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.autotune(
    configs=_configs((32, 64), (64, 128)), key=_KEY, prune_configs_by=_prune("_dkdv_kernel")
)
@triton.jit
def _dkdv_kernel(Q, KNew, VNew, DOut, Lse, Delta, DK, DV,
                 stride_qb, stride_ql, stride_qh, stride_knb, stride_knl, stride_knh,
                 stride_vnb, stride_vnl, stride_vnh,
                 Lq, Ln, H, KvH, D, qk_scale, scale,
                 GROUP: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # per block of new tokens: dV = sum P^T dO, dK = scale sum dS^T Q over the group's queries
    pid_n = tl.program_id(0)
    bk = tl.program_id(1)
    b = (bk // KvH).to(tl.int64)
    kv_head = bk % KvH
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    key_mask = (offs_n < Ln)[:, None] & d_mask[None, :]
    tok = offs_n.to(tl.int64)[:, None]
    k_at = b * stride_knb + tok * stride_knl + kv_head * stride_knh + offs_d[None, :]
    v_at = b * stride_vnb + tok * stride_vnl + kv_head * stride_vnh + offs_d[None, :]
    k = tl.load(KNew + k_at, mask=key_mask, other=0.0)
    v = tl.load(VNew + v_at, mask=key_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = kv_head * GROUP + g
        for start in range(0, Lq, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_mask = offs_m < Lq
            at = b * stride_qb + offs_m.to(tl.int64)[:, None] * stride_ql + h * stride_qh
            q = tl.load(Q + at + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            do = tl.load(DOut + at + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                         other=0.0)  # fmt: skip
            row = (b * H + h) * Lq + offs_m
            lse2 = tl.load(Lse + row, mask=m_mask, other=0.0) * 1.4426950408889634
            delta = tl.load(Delta + row, mask=m_mask, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [N, M]
            pt = tl.where(m_mask[None, :], tl.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + k_at, (dk * scale).to(DK.dtype.element_ty), mask=key_mask)
    tl.store(DV + v_at, dv.to(DV.dtype.element_ty), mask=key_mask)


def fp32_precision() -> str:
    """``input_precision`` of fp32 dots: ``"tf32"`` when PyTorch lets fp32 CUDA matmuls use
    TF32 (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, also set by
    ``torch.set_float32_matmul_precision("high")`` or the older ``allow_tf32 = True``), else
    ``"ieee"`` (PyTorch's default: exact fp32 products on CUDA cores, no tensor cores)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9; the older flag can raise
        return "tf32" if matmul.fp32_precision == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def _common(q, kv_pages):
    """Compile-time parameters shared by the kernels (16-bit dots ignore ``PRECISION``)."""
    dim = q.shape[-1]
    return dict(
        GROUP=q.shape[2] // kv_pages.shape[3],
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        PRECISION=fp32_precision() if q.dtype == torch.float32 else "tf32",
    )


def _pool_strides(kv_pages):
    return kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2)


def _last_dim_contiguous(*tensors):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def forward(q, k_new, v_new, kv_pages, page_table, ctx_lens, scale):
    """Triton forward: ``(out [B, Lq, H, D] q.dtype, lse [B, H, Lq] fp32)``."""
    q, k_new, v_new = _last_dim_contiguous(q, k_new, v_new)
    batch, lq, heads, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, lq, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    table = page_table.contiguous()
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _forward_kernel[grid](
        q, k_new, v_new, kv_pages, table, ctx_lens.contiguous(), out, lse,
        *q.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3], *out.stride()[:3],
        *_pool_strides(kv_pages), table.stride(0),
        lq, k_new.shape[1], heads, kv_pages.shape[2], dim, scale * LOG2E,
        **_common(q, kv_pages),
    )  # fmt: skip
    return out, lse


def backward(dout, dlse, q, k_new, v_new, kv_pages, page_table, ctx_lens, out, lse, scale):
    """Triton backward: ``(dq, dk_new, dv_new)`` in the inputs' dtypes."""
    q, dout, out = q.contiguous(), dout.contiguous(), out.contiguous()
    k_new, v_new = _last_dim_contiguous(k_new, v_new)
    batch, lq, heads, dim = q.shape
    ln, kv_heads = k_new.shape[1], kv_pages.shape[3]
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k_new), torch.zeros_like(v_new)
    if q.numel() == 0:
        return dq, dk, dv
    common = _common(q, kv_pages)
    delta = torch.empty(batch, heads, lq, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(lq, 32), batch * heads)](
        out, dout, dlse.contiguous(), delta, *out.stride()[:3], lq, heads, dim,
        BLOCK_M=32, BLOCK_D=common["BLOCK_D"],
    )  # fmt: skip
    table = page_table.contiguous()
    knv_strides = (*k_new.stride()[:3], *v_new.stride()[:3])
    grid_q = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _dq_kernel[grid_q](
        q, k_new, v_new, kv_pages, table, ctx_lens.contiguous(), dout, lse, delta, dq,
        *q.stride()[:3], *knv_strides, *_pool_strides(kv_pages), table.stride(0),
        lq, ln, heads, kv_pages.shape[2], dim, scale * LOG2E, scale, **common,
    )  # fmt: skip
    if ln:
        grid_k = lambda meta: (triton.cdiv(ln, meta["BLOCK_N"]), batch * kv_heads)  # noqa: E731
        _dkdv_kernel[grid_k](
            q, k_new, v_new, dout, lse, delta, dk, dv, *q.stride()[:3], *knv_strides,
            lq, ln, heads, kv_heads, dim, scale * LOG2E, scale, **common,
        )  # fmt: skip
    return dq, dk, dv
