"""Routed attention: G = 8 branches each attend to their own 12 frames of a shared paged history
plus their own new block of 3 frames, one layer.

Providers, measured in the same run:
- ``eager gather + SDPA`` (baseline, what reference implementations do): index the pool through
  the page tables (a gathered copy per branch), concatenate the new tokens, then
  ``scaled_dot_product_attention``; ``gathered_MiB`` = bytes of those copies.
- ``SDPA on pre-gathered K/V``: the same attention over K/V already contiguous ("routing for
  free": the gather is not timed).
- ``dense masked SDPA``: every branch attends over the whole resident pool plus its new tokens
  with a boolean mask selecting its pages.
- ``FlexAttention, page block mask`` (GPU): one sequence of all branches' queries over the pool
  ++ all new tokens, the block mask built from the page tables once, outside the timing.
- ``flash_attn_with_kvcache``: paged flash-attn needs pages of a multiple of 256 tokens; a Wan
  frame is 1560, so frame-level routing cannot be expressed with it (noted, not measured).
- ``ours (cpp)`` on CPU, ``ours (triton)`` on GPU: ``kvpo_kernels.routed_attention`` reading the
  pages in place (0 gathered bytes).

Phases: ``forward`` (no grad, as in rollouts), ``backward`` (gradients of q, k_new, v_new from a
kept graph) and ``forward+backward``.

Shapes: H = 12 heads x D = 128, G = 8 rows, 24 resident frames in the pool, each row attends 12
frames (3 sink, 5 routed, 4 nearest) + its new block of 3 frames; Lq = Ln = 3 frames. CPU: 130
tokens per frame (a Wan frame of 1560 cut by 12), fp32 (the CPU default) and bf16. GPU: 1560
tokens per frame (a Wan-1.3B layer: Lq = 4680, 18720 cached + 4680 new keys), bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvpo_kernels
from kvpo_kernels.registry import unavailable_reason

SUITE = "routed_attention"
G, HEADS, DIM, POOL_FRAMES, ATTENDED_FRAMES, BLOCK_FRAMES = 8, 12, 128, 24, 12, 3


def _setting(device):
    if device.type == "cuda":
        return dict(tokens=1560, dtypes=(torch.bfloat16,), ours="triton")
    return dict(tokens=130, dtypes=(torch.float32, torch.bfloat16), ours="cpp")


def _inputs(tokens, dtype, device):
    """Pool, routed page tables (sink ++ 5 routed older ++ 4 nearest frames), q and new K/V."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL_FRAMES, 2, tokens, HEADS, DIM, generator=gen).to(device, dtype)
    older = torch.arange(3, POOL_FRAMES - 4)
    rows = []
    for _ in range(G):
        routed = older[torch.randperm(len(older), generator=gen)[:5]].sort().values
        rows.append(
            torch.cat([torch.arange(3), routed, torch.arange(POOL_FRAMES - 4, POOL_FRAMES)])
        )
    table = torch.stack(rows).to(device, torch.int32)
    ctx_lens = torch.full((G,), ATTENDED_FRAMES * tokens, dtype=torch.int32, device=device)
    lq = BLOCK_FRAMES * tokens
    q, k_new, v_new = (
        torch.randn(G, lq, HEADS, DIM, generator=gen).to(device, dtype) for _ in range(3)
    )
    return q, k_new, v_new, pool, table, ctx_lens


def _sdpa(q, k, v, mask=None):
    """SDPA on [B, L, H, D] tensors."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _gather(pool, table, k_new, v_new):
    """Each row's pages ++ its new tokens, contiguous: [B, 12 frames + new, H, D] K and V."""
    ids = table.long()
    keys = torch.cat([pool[ids, 0].flatten(1, 2), k_new], dim=1)
    values = torch.cat([pool[ids, 1].flatten(1, 2), v_new], dim=1)
    return keys, values


def _gathered_bytes(pool, table, k_new):
    per_copy = table.numel() * pool[0, 0].numel() * pool.element_size()
    cat = 2 * (per_copy + k_new.numel() * k_new.element_size())
    return 2 * per_copy + cat


def _dense_masked(pool, table, q, k_new, v_new):
    """Attention over the whole pool ++ own new tokens, masked to the pages: fn(q, k, v)."""
    frames, tokens = pool.shape[0], pool.shape[2]
    pool_k = pool[:, 0].flatten(0, 1).unsqueeze(0).expand(q.shape[0], -1, -1, -1)
    pool_v = pool[:, 1].flatten(0, 1).unsqueeze(0).expand(q.shape[0], -1, -1, -1)
    allowed = torch.zeros(q.shape[0], frames, dtype=torch.bool, device=q.device)
    allowed.scatter_(1, table.long(), True)
    key_mask = torch.cat(
        [allowed.repeat_interleave(tokens, dim=1), allowed.new_ones(q.shape[0], k_new.shape[1])],
        dim=1,
    )[:, None, None, :]

    def run(q, k_new, v_new):
        keys = torch.cat([pool_k, k_new], dim=1)
        values = torch.cat([pool_v, v_new], dim=1)
        return _sdpa(q, keys, values, key_mask)

    return run


def _flex(pool, table, q, k_new):
    """FlexAttention over pool ++ every row's new tokens with a page block mask (GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows, lq, _, _ = q.shape
    frames, tokens, ln = pool.shape[0], pool.shape[2], k_new.shape[1]
    pooled = frames * tokens
    allowed = torch.zeros(rows, frames, dtype=torch.bool, device=q.device)
    allowed.scatter_(1, table.long(), True)

    def mask_mod(b, h, q_idx, kv_idx):
        row = q_idx // lq
        cached = allowed[row, torch.clamp(kv_idx // tokens, max=frames - 1)] & (kv_idx < pooled)
        return cached | ((kv_idx >= pooled) & ((kv_idx - pooled) // ln == row))

    block_mask = create_block_mask(
        mask_mod, 1, None, rows * lq, pooled + rows * ln, device=q.device
    )
    attend = torch.compile(flex_attention)
    pool_k = pool[:, 0].flatten(0, 1).transpose(0, 1).unsqueeze(0)  # [1, H, pooled, D]
    pool_v = pool[:, 1].flatten(0, 1).transpose(0, 1).unsqueeze(0)

    def run(q, k_new, v_new):
        def heads_first(x):
            return x.flatten(0, 1).transpose(0, 1).unsqueeze(0)  # [1, H, rows * L, D]

        keys = torch.cat([pool_k, heads_first(k_new)], dim=2)
        values = torch.cat([pool_v, heads_first(v_new)], dim=2)
        out = attend(heads_first(q), keys, values, block_mask=block_mask)
        return out[0].transpose(0, 1).unflatten(0, (rows, lq))

    return run


def _providers(inputs, device, ours):
    q, k_new, v_new, pool, table, ctx_lens = inputs
    # leaves of their own: its backward forms dK, dV of every key as SDPA does
    keys, values = (t.detach().requires_grad_() for t in _gather(pool, table, k_new, v_new))
    providers = {
        "eager gather + SDPA": lambda q, k, v: _sdpa(q, *_gather(pool, table, k, v)),
        "SDPA on pre-gathered K/V": lambda q, k, v: _sdpa(q, keys, values),
        "dense masked SDPA": _dense_masked(pool, table, q, k_new, v_new),
        f"ours ({ours})": lambda q, k, v: kvpo_kernels.routed_attention(
            q, k, v, pool, table, ctx_lens, backend=ours
        ),
    }
    if device.type == "cuda":
        providers["FlexAttention, page block mask"] = _flex(pool, table, q, k_new)
    return providers


def _phases(fn, q, k_new, v_new):
    """Callables timing the forward (no grad), the backward of a kept graph, and both."""
    leaves = [t.detach().requires_grad_() for t in (q, k_new, v_new)]
    grad_out = torch.randn_like(q)
    graph_out = fn(*leaves)

    def forward():
        with torch.no_grad():
            return fn(q, k_new, v_new)

    def backward():
        return torch.autograd.grad(
            graph_out, leaves, grad_out, retain_graph=True, allow_unused=True
        )

    def forward_backward():
        return torch.autograd.grad(fn(*leaves), leaves, grad_out, allow_unused=True)

    return {"forward": forward, "backward": backward, "forward+backward": forward_backward}


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_routed_attention(recorder, device, dtype_name):
    setting = _setting(device)
    dtype = getattr(torch, dtype_name)
    if dtype not in setting["dtypes"]:
        pytest.skip(f"{dtype_name} is not benchmarked on {device.type}")
    ours = setting["ours"]
    if unavailable_reason(ours, device.type) is not None:
        pytest.skip(f"{ours}: {unavailable_reason(ours, device.type)}")
    tokens = setting["tokens"]
    inputs = _inputs(tokens, dtype, device)
    q, k_new, v_new, pool, table, _ = inputs
    providers = _providers(inputs, device, ours)
    try:
        import flash_attn  # noqa: F401

        print(
            f"\nflash_attn_with_kvcache not measured: its pages must hold a multiple of 256 "
            f"tokens and a frame (the routing unit) holds {tokens}"
        )
    except ImportError:
        pass
    reference = providers[f"ours ({ours})"](q, k_new, v_new).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # |out| < 1: averages of unit normals
    shape = (
        f"B={G} H={HEADS} D={DIM} {tokens} tok/frame, {ATTENDED_FRAMES} of {POOL_FRAMES} frames "
        f"+ {BLOCK_FRAMES} new, Lq={q.shape[1]} {dtype_name}"
    )
    gathered = _gathered_bytes(pool, table, k_new)
    for name, fn in providers.items():
        with torch.no_grad():
            err = (fn(q, k_new, v_new).float() - reference).abs().max().item()
        assert err < tol, f"{name} disagrees with ours by {err}"
        for phase, timed in _phases(fn, q, k_new, v_new).items():
            extra = {}
            if name == "eager gather + SDPA":
                extra["gathered_MiB"] = round(gathered / 2**20, 1)
            elif name.startswith("ours"):
                extra["gathered_MiB"] = 0
            recorder.measure(
                SUITE, f"{phase}: {shape}", name, timed, device,
                baseline=name == "eager gather + SDPA", **extra,
            )  # fmt: skip


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
