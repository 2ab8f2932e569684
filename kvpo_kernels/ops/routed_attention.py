"""Routed attention: each batch row attends to its own cached tokens, read through a page table
from a shared paged KV pool, followed by its own dense new tokens.

``routed_attention(q, k_new, v_new, kv_pages, page_table, ctx_lens)`` computes, for row ``b``,
head ``h`` and query ``i`` (no mask: history and the new block are fully visible)::

    keys_b  = [pool K of token t, t < ctx_lens[b]]  ++  k_new[b]     (the same for V)
    token t = kv_pages[page_table[b, t // page_size], :, t % page_size]
    out[b, i, h] = softmax(scale * q[b, i, h] . keys_b[:, h // (H / H_kv)]) @ values_b
    lse[b, h, i] = logsumexp(scale * q[b, i, h] . keys_b[:, h // (H / H_kv)])   (natural log)

An empty row (no context, no new tokens) gives ``out = 0`` and ``lse = -inf``. Gradients flow to
``q``, ``k_new`` and ``v_new`` (and through ``lse`` when it is used, e.g. by
:func:`merge_attention_states`); the pool gets none.

Backends: ``torch`` (this module: explicit gather, then attention in the input dtype with an fp32
softmax), ``cpp`` (OpenMP CPU kernel reading pages in place, ``csrc/cpu/routed_attention.cpp``),
``triton`` (flash-attention-style kernels, :mod:`kvpo_kernels.ops.triton.routed_attention`).
Every backend implements the forward ``(out, lse)`` and the backward ``(dq, dk_new, dv_new)``;
both are ``torch.library`` custom ops (``kvpo::routed_attention_fwd`` / ``_bwd``) taking the
backend name, with fake implementations and a registered autograd formula.
"""

from __future__ import annotations

import math

import torch

from kvpo_kernels import extension, registry
from kvpo_kernels.checks import check_ids_in_range, check_index_tensor, check_same_device
from kvpo_kernels.ops._registration import backend_op, triton_kernel

OP = "routed_attention"
OP_BACKWARD = "routed_attention_backward"
# The cpp backend has CPU kernels only; on CUDA the triton kernels serve this op.
registry.op(OP, order={"cuda": ("triton", "torch")})
registry.op(OP_BACKWARD, order={"cuda": ("triton", "torch")})
registry.register(OP, "triton")(triton_kernel("routed_attention", "forward"))
registry.register(OP_BACKWARD, "triton")(triton_kernel("routed_attention", "backward"))


def _gather_context(kv_pages: torch.Tensor, page_table: torch.Tensor, ctx_lens: torch.Tensor):
    """Each row's cached K and V, gathered contiguous.

    Returns ``k, v: [B, T, H_kv, D]`` with ``T = max(ctx_lens)`` (zeros past a row's length) and
    ``valid: [B, T]`` bool.
    """
    batch, page_size = page_table.shape[0], kv_pages.shape[2]
    longest = int(ctx_lens.max()) if batch else 0
    t = torch.arange(longest, device=kv_pages.device)
    valid = t[None, :] < ctx_lens[:, None]
    pages = torch.where(valid, page_table.long()[:, t // page_size], 0)
    slots = (t % page_size).expand(batch, longest)
    k = kv_pages[pages, 0, slots].masked_fill(~valid[..., None, None], 0)
    v = kv_pages[pages, 1, slots].masked_fill(~valid[..., None, None], 0)
    return k, v, valid


def _gathered_keys(q, k_new, v_new, kv_pages, page_table, ctx_lens):
    """Keys and values of each row, context then new tokens, repeated to q's heads.

    Returns ``keys, values: [B, Lk, H, D]`` and ``visible: [B, Lk]`` bool (False on padding).
    """
    k_ctx, v_ctx, valid = _gather_context(kv_pages, page_table, ctx_lens)
    keys = torch.cat([k_ctx, k_new], dim=1)
    values = torch.cat([v_ctx, v_new], dim=1)
    visible = torch.cat([valid, valid.new_ones(k_new.shape[:2])], dim=1)
    group = q.shape[2] // keys.shape[2]
    return keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2), visible


def _probabilities(q, keys, visible, scale):
    """Softmax probabilities ``[B, H, Lq, Lk]`` fp32 and ``lse [B, H, Lq]`` fp32 (-inf if empty)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys).float() * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isinf(lse), 0.0, lse)
    return torch.exp(scores - finite_lse[..., None]), lse


@registry.register(OP, "torch")
def _forward_torch(q, k_new, v_new, kv_pages, page_table, ctx_lens, scale):
    """Gather, then attention in the input dtype with an fp32 softmax."""
    keys, values, visible = _gathered_keys(q, k_new, v_new, kv_pages, page_table, ctx_lens)
    probs, lse = _probabilities(q, keys, visible, scale)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(q.dtype), values), lse


@registry.register(OP_BACKWARD, "torch")
def _backward_torch(dout, dlse, q, k_new, v_new, kv_pages, page_table, ctx_lens, out, lse, scale):
    """The attention backward in fp32 on the gathered keys (recomputed probabilities)::

    dV = P^T dO,  dS = P * (dO V^T - (rowsum(dO * O) - dlse)),  dQ = scale dS K,  dK = scale dS^T Q
    """
    q32, dout32 = q.float(), dout.float()
    args = (q32, k_new.float(), v_new.float(), kv_pages.float(), page_table, ctx_lens)
    keys, values, visible = _gathered_keys(*args)
    probs, _ = _probabilities(q32, keys, visible, scale)
    out32 = torch.einsum("bhqk,bkhd->bqhd", probs, values)
    delta = (dout32 * out32).sum(-1).transpose(1, 2) - dlse  # [B, H, Lq]
    dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout32, values) - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, keys) * scale
    new = slice(keys.shape[1] - k_new.shape[1], keys.shape[1])
    batch, ln, kv_heads, dim = k_new.shape
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores[..., new], q32) * scale
    dv = torch.einsum("bhqk,bqhd->bkhd", probs[..., new], dout32)
    dk = dk.reshape(batch, ln, kv_heads, -1, dim).sum(3)  # sum over each kv head's query group
    dv = dv.reshape(batch, ln, kv_heads, -1, dim).sum(3)
    return dq.to(q.dtype), dk.to(k_new.dtype), dv.to(v_new.dtype)


def _cpu_only(q: torch.Tensor) -> None:
    if q.device.type != "cpu":
        raise registry.BackendUnavailable(
            f"{OP}: the cpp backend has CPU kernels only, got {q.device} tensors; use triton"
        )


@registry.register(OP, "cpp")
def _forward_cpp(q, k_new, v_new, kv_pages, page_table, ctx_lens, scale):
    """OpenMP kernel reading the pages in place (csrc/cpu/routed_attention.cpp)."""
    _cpu_only(q)
    return extension.ops().routed_attention_fwd(
        q, k_new, v_new, kv_pages, page_table.contiguous(), ctx_lens.contiguous(), scale
    )


@registry.register(OP_BACKWARD, "cpp")
def _backward_cpp(dout, dlse, q, k_new, v_new, kv_pages, page_table, ctx_lens, out, lse, scale):
    _cpu_only(q)
    return extension.ops().routed_attention_bwd(
        dout, dlse, q, k_new, v_new, kv_pages, page_table.contiguous(), ctx_lens.contiguous(),
        out, lse, scale,
    )  # fmt: skip


def _forward_fake(q, k_new, v_new, kv_pages, page_table, ctx_lens, scale, backend):
    batch, lq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, lq), dtype=torch.float32)


def _backward_fake(dout, dlse, q, k_new, v_new, kv_pages, page_table, ctx_lens, out, lse, scale,
                   backend):  # fmt: skip
    return q.new_empty(q.shape), k_new.new_empty(k_new.shape), v_new.new_empty(v_new.shape)


@backend_op("kvpo::routed_attention_bwd", OP_BACKWARD, fake=_backward_fake)
def _backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk_new, dv_new)`` of routed attention on ``backend``."""


def _setup_context(ctx, inputs, output):
    q, k_new, v_new, kv_pages, page_table, ctx_lens, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k_new, v_new, kv_pages, page_table, ctx_lens, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, dlse):
    q, k_new, v_new, kv_pages, page_table, ctx_lens, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlse = torch.zeros_like(lse) if dlse is None else dlse.contiguous()
    dq, dk, dv = _backward_op(
        dout, dlse, q, k_new, v_new, kv_pages, page_table, ctx_lens, out, lse, ctx.scale,
        ctx.backend,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None


@backend_op(
    "kvpo::routed_attention_fwd",
    OP,
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
)
def _forward_op(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of routed attention on ``backend``."""


def _check(q, k_new, v_new, kv_pages, page_table, ctx_lens) -> None:
    device = q.device
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Lq, H, D], got shape {tuple(q.shape)}")
    batch, _, heads, dim = q.shape
    if kv_pages.dim() != 5 or kv_pages.shape[1] != 2:
        raise ValueError(
            f"kv_pages must be [P, 2, page_size, H_kv, D], got shape {tuple(kv_pages.shape)}"
        )
    if kv_pages.requires_grad:
        raise ValueError(
            "kv_pages requires grad, but routed attention gives the KV pool no gradient: "
            "write pages under torch.no_grad() or pass kv_pages.detach()"
        )
    num_pages, _, page_size, kv_heads, _ = kv_pages.shape
    if kv_pages.shape[4] != dim:
        raise ValueError(f"kv_pages has head dim {kv_pages.shape[4]}, q has {dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's {heads} heads must be a multiple of kv_pages' {kv_heads} heads")
    page_strides = (page_size * kv_heads * dim, kv_heads * dim, dim, 1)
    if any(n > 1 and s != e for n, s, e in zip(kv_pages.shape[1:], kv_pages.stride()[1:],
                                               page_strides)):  # fmt: skip
        raise ValueError(
            f"each page of kv_pages must be contiguous: strides {kv_pages.stride()[1:]} for "
            f"dims 1..4, expected {page_strides}"
        )
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_same_device(name, t, device)
        if t.dim() != 4 or t.shape != (batch, t.shape[1], kv_heads, dim):
            raise ValueError(
                f"{name} must be [B={batch}, Ln, H_kv={kv_heads}, D={dim}], got {tuple(t.shape)}"
            )
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new is {tuple(k_new.shape)} but v_new is {tuple(v_new.shape)}")
    check_same_device("kv_pages", kv_pages, device)
    for name, t in (("k_new", k_new), ("v_new", v_new), ("kv_pages", kv_pages)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype}, q is {q.dtype}: all must share one dtype")
    check_index_tensor(page_table, "page_table", device)
    check_index_tensor(ctx_lens, "ctx_lens", device)
    if page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(
            f"page_table must be [B={batch}, max_pages], got {tuple(page_table.shape)}"
        )
    if ctx_lens.shape != (batch,):
        raise ValueError(f"ctx_lens must be [B={batch}], got {tuple(ctx_lens.shape)}")
    if torch.compiler.is_compiling() or batch == 0:
        return  # data-dependent checks cannot be traced
    capacity = page_table.shape[1] * page_size
    if device.type == "cpu":
        bad = ((ctx_lens < 0) | (ctx_lens > capacity)).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise ValueError(
                f"ctx_lens[{b}] = {int(ctx_lens[b])}, expected 0..{capacity} "
                f"({page_table.shape[1]} pages of {page_size} tokens in the page table)"
            )
    else:  # enqueued, no device synchronisation
        torch._assert_async(
            ((ctx_lens >= 0) & (ctx_lens <= capacity)).all(),
            f"ctx_lens must lie in 0..{capacity} (page table width x page size)",
        )
    pages_used = (ctx_lens[:, None] + page_size - 1) // page_size
    used = torch.arange(page_table.shape[1], device=device)[None, :] < pages_used
    check_ids_in_range(page_table.masked_fill(~used, 0), "page_table", num_pages)


def routed_attention(
    q: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention of each row's queries over its paged cached tokens followed by its new tokens.

    Args:
        q: ``[B, Lq, H, D]`` queries (fp32 | fp16 | bf16).
        k_new, v_new: ``[B, Ln, H_kv, D]`` the row's own new keys/values (attended after the
            cached tokens; ``Ln`` may differ from ``Lq``), or both None for none.
        kv_pages: ``[P, 2, page_size, H_kv, D]`` one layer's pool (index 0 = K, 1 = V), each page
            contiguous, same dtype as ``q``; must not require grad.
        page_table: ``[B, max_pages]`` int32 page ids in attention order; entries past a row's
            ``ceil(ctx_lens[b] / page_size)`` pages are ignored.
        ctx_lens: ``[B]`` int32 number of cached tokens row ``b`` attends (a prefix of its pages).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp.
        backend: ``"torch" | "triton" | "cpp" | "auto"`` (default: $KVPO_KERNELS_BACKEND or auto).

    Returns:
        ``out: [B, Lq, H, D]`` in ``q``'s dtype; with ``return_lse`` also ``lse: [B, H, Lq]`` fp32
        natural log (``-inf`` and ``out = 0`` for a row with no context and no new tokens).
    """
    if (k_new is None) != (v_new is None):
        raise ValueError("pass both k_new and v_new, or neither")
    if k_new is None:
        empty = q.new_empty((q.shape[0], 0, kv_pages.shape[3], q.shape[-1]))
        k_new, v_new = empty, empty
    _check(q, k_new, v_new, kv_pages, page_table, ctx_lens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = registry.resolve(OP, q.device, backend)
    out, lse = _forward_op(q, k_new, v_new, kv_pages, page_table, ctx_lens, scale, chosen)
    return (out, lse) if return_lse else out
