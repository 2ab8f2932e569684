"""MemFlow's sparse memory activation (SMA) against plain transcriptions of their code.

The oracles follow ``models/memflow/wan/modules/causal_model.py``: ``CausalWanSelfAttention.
dynamic_topk_routing_attention`` (chunks of one frame, mean-pooled query and key descriptors,
per-head ``torch.topk`` of 3, sorted) and the ``SMA`` branch of ``CausalWanSelfAttention.forward``
(``k_global = k_sink ++ k_bank`` routed, then ``k_global ++ k_local``, where ``k_sink`` is the
cache's first ``sink_size`` frames, the block's own at the start, and ``k_local`` the rest of the
window with the block), on dense tensors and diffusers' whole-sequence forwards.
"""

import pytest
import torch
import torch.nn.functional as F

from kvpo.models import CachePolicy, FewStepSampler, FrameCache, generate, recache
from kvpo.models.sparse_memory import SparseMemory, select_frames
from tests.kvpo.models.reference import random_model
from tests.kvpo.models.test_memory_bank import (
    FPB,
    LOCAL,
    RESIDENT,
    SINK,
    TOL,
    _generation_inputs,
    _ListAttention,
    _their_generation,
)


# --------------------------------------------------------------------------- selection
def _their_routing(query, key, value, chunk, top_k=3):
    """Their ``dynamic_topk_routing_attention`` (one row): ``query [Lq, H, D]``, ``key, value
    [n * chunk, H, D]`` -> the selected ``k, v [k * chunk, H, D]``, head by head."""
    n, heads = key.shape[0] // chunk, key.shape[1]
    phi_q = query.mean(0)  # [H, D]
    phi_k = key.view(n, chunk, heads, -1).mean(1)  # [n, H, D]
    ks, vs = [], []
    for h in range(heads):
        scores = phi_k[:, h] @ phi_q[h]  # [n]
        top = torch.topk(scores, min(top_k, n)).indices.sort().values
        rows = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in top.tolist()])
        ks.append(key[rows, h])
        vs.append(value[rows, h])
    return torch.stack(ks, 1), torch.stack(vs, 1)


@pytest.mark.parametrize("count", [0, 2, 3, 6])
def test_selection_equals_their_topk_routing(count):
    """Each row and head keeps the candidates of highest mean-query . mean-key score, and gets
    their K/V from the pages (rows hold different pages)."""
    torch.manual_seed(count)
    T, H, D, P = 4, 3, 8, 10
    pages = torch.randn(P, 2, T, H, D)
    q = torch.randn(2, 12, H, D)
    candidates = torch.stack([torch.randperm(P)[:count] for _ in range(2)])
    memory = SparseMemory([candidates])
    got = memory.selected_kv(0, q, pages)
    if count == 0:
        assert got is None
        return
    for b in range(2):
        key = pages[candidates[b], 0].reshape(-1, H, D)
        value = pages[candidates[b], 1].reshape(-1, H, D)
        k, v = _their_routing(q[b], key, value, T)
        assert got[0].shape == (2, min(3, count) * T, H, D)
        torch.testing.assert_close(got[0][b], k, rtol=0, atol=0)
        torch.testing.assert_close(got[1][b], v, rtol=0, atol=0)
    if count == 6:  # the heads choose differently
        chosen = select_frames(q, pages[candidates, 0])
        assert any(not torch.equal(chosen[b, 0], chosen[b, h]) for b in range(2) for h in (1, 2))


def test_selection_rejects_bad_shapes():
    with pytest.raises(ValueError, match="frame_k"):
        select_frames(torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 4, 2))
    with pytest.raises(ValueError, match="own key head"):
        select_frames(torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 4, 1, 8))


# --------------------------------------------------------------------------- generation
def _tokens(frames, T):
    """Token indices of ``frames`` (``T`` tokens a frame), frame by frame."""
    return torch.cat([torch.arange(f * T, (f + 1) * T) for f in frames])


def _their_sma(q, k, v, out, rows, candidates, local, T):
    """Their routed attention of the query tokens ``rows`` (``q, k, v: [1, N, H, D]``), written
    into ``out [1, N, H, D]`` head by head: SDPA over the top-3 (at most) of the ``candidates``
    frames by mean query . mean key, sorted, then the ``local`` frames. Returns whether two
    heads chose differently."""
    phi_q = q[0, rows].mean(0)  # [H, D]
    phi_k = torch.stack([k[0, _tokens([c], T)].mean(0) for c in candidates])  # [n, H, D]
    picks = []
    for h in range(q.shape[2]):
        scores = phi_k[:, h] @ phi_q[h]
        top = torch.topk(scores, min(3, len(candidates))).indices.sort().values
        picks.append([candidates[i] for i in top.tolist()])
        idx = _tokens(picks[-1] + local, T)
        out[0, rows, h] = F.scaled_dot_product_attention(
            q[0, rows, h][None], k[0, idx, h][None], v[0, idx, h][None]
        )[0]
    return any(p != picks[0] for p in picks)


class _SmaAttention(_ListAttention):
    """Their SMA attention on the whole sequence: the queries of the block at ``f0`` attend,
    head ``h``, to the top-3 (by their block's mean query) of the sink region's frames and the
    layer's visible bank frames, then to the rest of the window and the block (SDPA per head).
    Records whether two heads ever chose differently."""

    def __init__(self, T):
        super().__init__(T)
        self.blocks, self.heads_differ = {}, False

    def set_block(self, f0, bank_frames):
        sink = list(range(SINK))  # their temp_k[:, :sink_tokens]: the block's own at f0 = 0
        local = list(range(max(SINK, f0 + FPB - (LOCAL - SINK)), f0 + FPB))
        self.blocks[f0] = (sink + bank_frames, local)

    def __call__(self, attn, hidden, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        T = self.T
        q, k, v = self.qkv(attn, hidden, rotary_emb)
        out = torch.zeros_like(q)
        for f0, (candidates, local) in self.blocks.items():
            rows = _tokens(range(f0, f0 + FPB), T)
            self.heads_differ |= _their_sma(q, k, v, out, rows, candidates, local, T)
        return attn.to_out[1](attn.to_out[0](out.flatten(2)))


def test_sma_generation_equals_their_dense_transcription():
    """Generation with SMA (sink 3 + a bank of 2: up to 5 candidates, 3 kept per head) equals
    their attention; it differs from the whole bank's."""
    model = random_model()
    frames, size, interval = 27, 2, 2
    noise, renoise, embeds = _generation_inputs(frames)
    sigmas = [float(s) for s in FewStepSampler().schedule.sigmas()]
    seen = []

    def proc(T):
        seen.append(_SmaAttention(T))
        return seen[-1]

    ref = _their_generation(model, embeds, noise, renoise, sigmas, size, interval, proc)
    assert any(p.heads_differ for p in seen)
    outs = {}
    for sma in (True, False):
        policy = CachePolicy(
            SINK, LOCAL, RESIDENT, FPB, bank_size=size, record_interval=interval, sma=sma
        )
        cache = FrameCache.create(model.config, policy, num_pages=64)
        with torch.no_grad():
            outs[sma] = generate(
                model, cache, cache.new_rows(1), model.encode_text(embeds), noise,
                renoise=renoise,
            ).latents  # fmt: skip
    torch.testing.assert_close(outs[True], ref, **TOL)
    assert (outs[False] - ref).abs().max() > 1e-3  # SMA changes the video


def test_routed_views_attend_to_the_whole_bank():
    """Their perturbed window (a routing plan) skips SMA: a routed view holds the sink and bank
    pages in its tables; the recache's window (``routed=False``) and default views select."""
    model = random_model()
    policy = CachePolicy(SINK, LOCAL, RESIDENT, FPB, bank_size=2, record_interval=1, sma=True)
    cache = FrameCache.create(model.config, policy, num_pages=64)
    rows = cache.new_rows(2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 3, 12, 16, 16, generator=g)
    text = model.encode_text(torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        generate(model, cache, rows, text, noise, renoise=torch.randn(3, 1, 3, 12, 16, 16))
    cache.bank_refresh(rows, text)
    plan = [[0, 1, 2, 9, 10, 11]] * 2
    routed = cache.view(rows, 12, FPB, plans=plan)
    assert routed.memory is None and routed.table(0)[0].shape[1] == 6 + 2
    for view in (cache.view(rows, 12, FPB), cache.view(rows, 12, FPB, plans=plan, routed=False)):
        assert view.layer_tables is None and view.page_table.shape[1] == 3  # the window
        assert view.memory.rows is None
        assert [tuple(c.shape) for c in view.memory.candidates] in (
            [(2, 3 + 2)], [(2, 3 + 2)] * 2  # sink + bank, one tensor when the layers agree
        )  # fmt: skip
    mixed = cache.view(rows, 12, FPB, plans=[plan[0], None])  # a branch and the anchor
    assert mixed.memory.rows == [1] and mixed.memory.candidates[0].shape == (1, 3 + 2)
    assert mixed.table(0)[1].tolist() == [(6 + 2) * 16, 3 * 16]  # ctx_lens: 16 tokens a frame


# --------------------------------------------------------------------------- recache
class _RecacheSma(_ListAttention):
    """Frames ``lists`` attend as listed; the queries of the pass frames ``pass_frames`` attend,
    head ``h``, to the top-3 of the ``candidates`` (by the pass's mean query) then ``local``."""

    def __init__(self, T, lists, pass_frames, candidates, local):
        super().__init__(T)
        self.lists, self.pass_frames = lists, pass_frames
        self.candidates, self.local, self.heads_differ = candidates, local, False

    def __call__(self, attn, hidden, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        T = self.T
        q, k, v = self.qkv(attn, hidden, rotary_emb)
        out = self.listed(q, k, v)
        rows = _tokens(self.pass_frames, T)
        self.heads_differ |= _their_sma(q, k, v, out, rows, self.candidates, self.local, T)
        return attn.to_out[1](attn.to_out[0](out.flatten(2)))


def test_recache_pass_selects_by_its_mean_query():
    """Switch at 14 (sink 4, local 8, blocks of 2, no bank): the pass re-encoding frames 6..13
    attends, head by head, to 3 of the 4 sink frames (the old prompt's K/V) chosen by the mean
    of all its queries, then to frames 10..13 (their ``recache_after_switch`` with SMA)."""
    from dataclasses import replace

    from tests.kvpo.models.test_recache import _TwoPromptCross

    model = random_model(seed=3)
    policy = CachePolicy(sink_size=4, local_attn_size=8, resident_frames=16, frames_per_block=2)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(1, 3, 14, 16, 16, generator=g)
    renoise = torch.randn(3, 1, 3, 14, 16, 16, generator=g)
    old, new = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    served = {}
    for sma in (True, False):
        cache = FrameCache.create(model.config, policy, num_pages=64)
        (row,) = cache.new_rows(1)
        with torch.no_grad():  # generated without SMA: a block inside the sink region is not
            gen = generate(model, cache, [row], model.encode_text(old), noise, renoise=renoise)
            cache.policy = replace(policy, sma=sma)
            recache(model, cache, [row], gen.latents, model.encode_text(new), 14)
        view = cache.view([row], 14, 2, plans=[list(range(6, 14))])
        served[sma] = [cache.store.kv_pages(layer)[view.page_table[0].long()] for layer in (0, 1)]
    T = model.config.tokens_per_frame
    lists = {0: [0, 1], 1: [0, 1], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3], 4: [4], 5: [5]}
    t = model.transformer
    procs = [_RecacheSma(T, lists, list(range(6, 14)), [0, 1, 2, 3], [10, 11, 12, 13])
             for _ in t.blocks]  # fmt: skip
    flags = (torch.arange(14) < 4).repeat_interleave(T)
    old_states = t.condition_embedder.text_embedder(old)
    saved = [(b.attn1.processor, b.attn2.processor) for b in t.blocks]
    try:
        for b, p in zip(t.blocks, procs):
            b.attn1.set_processor(p)
            b.attn2.set_processor(_TwoPromptCross(old_states, flags))
        with torch.no_grad():
            t(gen.latents, torch.zeros(1, 14 * T), new, return_dict=False)
    finally:
        for b, (p1, p2) in zip(t.blocks, saved):
            b.attn1.set_processor(p1)
            b.attn2.set_processor(p2)
    assert any(p.heads_differ for p in procs)
    for layer, proc in enumerate(procs):
        k_ref, v_ref = (x[0, 6 * T :].unflatten(0, (8, T)) for x in proc.kv)
        torch.testing.assert_close(served[True][layer][:, 0], k_ref, **TOL)
        torch.testing.assert_close(served[True][layer][:, 1], v_ref, **TOL)
    assert (served[False][1][:, 0] - served[True][1][:, 0]).abs().max() > 1e-3
