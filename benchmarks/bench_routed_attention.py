"""Routed attention: G = 8 branches each attend to their own 12 frames of a shared paged history
plus their own new block of 3 frames, one layer.

Providers, measured in the same run, each checked first against the eager baseline's output:
- ``eager gather + SDPA`` (baseline, what reference implementations do): index the pool through
  the page tables (a gathered copy per branch), concatenate the new tokens, then
  ``scaled_dot_product_attention``; ``gathered_MiB`` = bytes of those copies.
- ``ours (cpp)`` on CPU, ``ours (triton)`` on GPU: ``kvpo_kernels.routed_attention`` reading the
  pages in place (0 gathered bytes).
- ``FlexAttention, page block mask``: ``torch.compile``'d ``flex_attention`` over a page-aligned
  layout. Every page is padded to a whole number of 128-token mask blocks (GPU: a 1560-token
  frame to 1664 = 13 blocks; CPU: 130 to 256 = 2 blocks), and so are each row's queries and new
  tokens; all rows form one sequence whose keys are the padded pool ++ every row's new tokens.
  The ``BlockMask`` is built from the page tables (``BlockMask.from_kv_blocks``): the query
  blocks of row b see in full the whole blocks of each of its pages and of its new tokens, and
  partially (the ``mask_mod`` drops the padding) each page's last block and its new tokens' last
  block. The padded pool is built once, outside the timing (the layout a store with
  block-aligned pages would keep: ``page_tokens``); each call concatenates the pool and the new
  tokens (``copied_MiB``). torch has no FlexAttention backward on CPU: forward only there.
- ``SDPA on pre-gathered K/V``: the same attention over K/V already contiguous ("routing for
  free": the gather is not timed).
- ``dense masked SDPA``: every branch attends over the whole resident pool plus its new tokens
  with a boolean mask selecting its pages.
- ``flash_attn_with_kvcache``: paged flash-attn needs pages of a multiple of 256 tokens; a Wan
  frame is 1560, so frame-level routing cannot be expressed with it (noted, not measured).

A provider that fails (an error, or output off the baseline's) is reported and the others are
still measured; the test fails at the end.

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
BASELINE = "eager gather + SDPA"
FLEX = "FlexAttention, page block mask"
FLEX_BLOCK = 128  # tokens per mask block on both devices (64 was not faster on CPU in one trial)
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


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _flex_block_mask(table, frames, tokens, lq, ln, block):
    """The page-aligned layout's ``BlockMask``, built from the page tables.

    Layout (every length a multiple of ``block``): keys are ``frames`` pages of ``page`` slots
    (``tokens`` real, then padding) followed by each row's ``ln_pad`` new-token slots (``ln``
    real); queries are each row's ``lq_pad`` slots (``lq`` real). Every query block of row ``b``
    sees in full the whole blocks of the pages ``table[b]`` and of its own new tokens, and
    partially the last block of each of them when it holds padding (``mask_mod`` drops it).
    ``mask_mod`` states the whole mask (row, page table and padding), so it also defines the
    attention where no block sparsity is used. Returns ``(block_mask, (page, lq_pad, ln_pad))``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows, device = table.shape[0], table.device
    page, lq_pad, ln_pad = (_round_up(n, block) for n in (tokens, lq, ln))
    pooled = frames * page
    kv_blocks = (pooled + rows * ln_pad) // block
    page_start = table.long() * (page // block)  # first block of each page: [rows, pages]
    new_start = (pooled + torch.arange(rows, device=device) * ln_pad)[:, None] // block

    def blocks(starts, first, count):  # blocks first .. first + count - 1 of each start
        return (starts[:, :, None] + torch.arange(first, first + count, device=device)).flatten(1)

    full = torch.cat([blocks(page_start, 0, tokens // block), blocks(new_start, 0, ln // block)], 1)
    partial = torch.cat(
        [blocks(page_start, tokens // block, int(tokens % block > 0)),
         blocks(new_start, ln // block, int(ln % block > 0))],
        1,
    )  # fmt: skip

    def per_query_block(ids):
        """[rows, n] block ids -> counts [1, 1, Q blocks], indices [1, 1, Q blocks, KV blocks]."""
        ids = ids.repeat_interleave(lq_pad // block, dim=0).to(torch.int32)
        counts = torch.full(ids.shape[:1], ids.shape[1], dtype=torch.int32, device=device)
        return counts[None, None], F.pad(ids, (0, kv_blocks - ids.shape[1]))[None, None]

    allowed = torch.zeros(rows, frames, dtype=torch.bool, device=device)
    allowed.scatter_(1, table.long(), True)

    def mask_mod(b, h, q_idx, kv_idx):
        row = q_idx // lq_pad
        page_id = torch.clamp(kv_idx // page, max=frames - 1)
        cached = (kv_idx < pooled) & (kv_idx % page < tokens) & allowed[row, page_id]
        new = torch.clamp(kv_idx - pooled, min=0)
        own = (kv_idx >= pooled) & (new // ln_pad == row) & (new % ln_pad < ln)
        return cached | own

    block_mask = BlockMask.from_kv_blocks(
        *per_query_block(partial),
        *per_query_block(full),
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(rows * lq_pad, pooled + rows * ln_pad),
    )
    return block_mask, (page, lq_pad, ln_pad)


def _flex(pool, table, q, k_new, block):
    """Compiled FlexAttention over the page-aligned layout: ``(fn(q, k, v), notes)``."""
    from torch.nn.attention.flex_attention import flex_attention

    rows, lq = q.shape[:2]
    frames, tokens, ln = pool.shape[0], pool.shape[2], k_new.shape[1]
    block_mask, (page, lq_pad, ln_pad) = _flex_block_mask(table, frames, tokens, lq, ln, block)
    padded = pool.new_zeros(frames, 2, page, *pool.shape[3:])
    padded[:, :, :tokens] = pool
    pool_k = padded[:, 0].flatten(0, 1).transpose(0, 1).unsqueeze(0)  # [1, H, frames * page, D]
    pool_v = padded[:, 1].flatten(0, 1).transpose(0, 1).unsqueeze(0)
    attend = torch.compile(flex_attention, dynamic=False)

    def heads_first(x, length):
        """[rows, L, H, D] -> [1, H, rows * length, D], each row zero-padded to ``length``."""
        x = F.pad(x, (0, 0, 0, 0, 0, length - x.shape[1]))
        return x.flatten(0, 1).transpose(0, 1).unsqueeze(0)

    def run(q, k_new, v_new):
        keys = torch.cat([pool_k, heads_first(k_new, ln_pad)], dim=2)
        values = torch.cat([pool_v, heads_first(v_new, ln_pad)], dim=2)
        out = attend(heads_first(q, lq_pad), keys, values, block_mask=block_mask)
        return out[0].transpose(0, 1).unflatten(0, (rows, lq_pad))[:, :lq]

    copied = 2 * (pool_k.numel() + rows * ln_pad * k_new[0, 0].numel()) * pool.element_size()
    return run, {"page_tokens": page, "copied_MiB": round(copied / 2**20, 1)}


def _providers(inputs, device, setting):
    """name -> (fn(q, k_new, v_new), differentiable, notes), in the order they are measured."""
    q, k_new, v_new, pool, table, ctx_lens = inputs
    ours = setting["ours"]
    # leaves of their own: its backward forms dK, dV of every key as SDPA does
    keys, values = (t.detach().requires_grad_() for t in _gather(pool, table, k_new, v_new))
    gathered = round(_gathered_bytes(pool, table, k_new) / 2**20, 1)
    flex, flex_notes = _flex(pool, table, q, k_new, FLEX_BLOCK)

    def routed(q, k, v):
        return kvpo_kernels.routed_attention(q, k, v, pool, table, ctx_lens, backend=ours)

    return {
        BASELINE: (
            lambda q, k, v: _sdpa(q, *_gather(pool, table, k, v)),
            True,
            {"gathered_MiB": gathered},
        ),
        f"ours ({ours})": (routed, True, {"gathered_MiB": 0}),
        FLEX: (flex, device.type != "cpu", flex_notes),
        "SDPA on pre-gathered K/V": (lambda q, k, v: _sdpa(q, keys, values), True, {}),
        "dense masked SDPA": (_dense_masked(pool, table, q, k_new, v_new), True, {}),
    }


def _phases(fn, q, k_new, v_new, differentiable=True):
    """Callables timing the forward (no grad), the backward of a kept graph, and both."""

    def forward():
        with torch.no_grad():
            return fn(q, k_new, v_new)

    if not differentiable:
        return {"forward": forward}
    leaves = [t.detach().requires_grad_() for t in (q, k_new, v_new)]
    grad_out = torch.randn_like(q)
    graph_out = fn(*leaves)

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
    try:
        import flash_attn  # noqa: F401

        print(
            f"\nflash_attn_with_kvcache not measured: its pages must hold a multiple of 256 "
            f"tokens and a frame (the routing unit) holds {tokens}"
        )
    except ImportError:
        pass
    providers = _providers(inputs, device, setting)
    with torch.no_grad():
        reference = providers[BASELINE][0](q, k_new, v_new).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # |out| < 1: averages of unit normals
    shape = (
        f"B={G} H={HEADS} D={DIM} {tokens} tok/frame, {ATTENDED_FRAMES} of {POOL_FRAMES} frames "
        f"+ {BLOCK_FRAMES} new, Lq={q.shape[1]} {dtype_name}"
    )
    failures = []
    for name, (fn, differentiable, notes) in providers.items():
        try:
            with torch.no_grad():
                err = (fn(q, k_new, v_new).float() - reference).abs().max().item()
            if not err < tol:
                raise AssertionError(f"output differs from {BASELINE}'s by {err:.3g} > {tol}")
            if not differentiable:
                print(f"\n{name}: forward only, torch {torch.__version__} has no backward here")
            for phase, timed in _phases(fn, q, k_new, v_new, differentiable).items():
                recorder.measure(
                    SUITE, f"{phase}: {shape}", name, timed, device,
                    baseline=name == BASELINE, **notes,
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001  (reported, the others measured, failed below)
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:400]}")
            print(f"\n{name} FAILED: {failures[-1]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    assert not failures, "; ".join(failures)


def _dense_blocks(counts, indices):
    """A BlockMask's (counts, indices) pair as a dense [Q blocks, KV blocks] 0/1 matrix."""
    counts, indices = counts[0, 0].long(), indices[0, 0].long()
    listed = torch.arange(indices.shape[-1]) < counts[:, None]
    dense = torch.zeros(indices.shape[0], indices.shape[-1] + 1, dtype=torch.int32)
    dense.scatter_(1, torch.where(listed, indices, indices.shape[-1]), 1)
    return dense[:, :-1]


@pytest.mark.parametrize("tokens,lq,ln,block", [(200, 150, 150, 128), (130, 390, 390, 64)])
def test_flex_page_block_mask(tokens, lq, ln, block):
    """The BlockMask built from the page tables equals the one torch derives from mask_mod.

    Full and partial blocks of both the KV (forward) and the Q (backward) orderings, on a small
    CPU layout, the pages not a whole number of blocks.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    frames, rows = 7, 3
    table = torch.tensor([[0, 2, 5], [1, 2, 6], [6, 3, 0]], dtype=torch.int32)
    ours, (page, lq_pad, ln_pad) = _flex_block_mask(table, frames, tokens, lq, ln, block)
    q_len, kv_len = rows * lq_pad, frames * page + rows * ln_pad
    derived = create_block_mask(ours.mask_mod, 1, 1, q_len, kv_len, "cpu", BLOCK_SIZE=block)
    for pair in (
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ):
        mine, torchs = (_dense_blocks(*(getattr(m, a) for a in pair)) for m in (ours, derived))
        assert torch.equal(mine, torchs), pair
    assert ours.seq_lengths == derived.seq_lengths


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
