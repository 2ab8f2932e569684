"""MemFlow's memory bank against plain transcriptions of their code.

The oracles follow ``models/memflow/wan/modules/causal_model.py`` (``CausalWanSelfAttention.
forward``: the bank's token indices, ``_apply_cache_updates``: the pending frame,
``_apply_cache_updates_before`` + ``compress_kv_bank``: the bank update) and
``pipeline/streaming_training.py`` (``generate_chunk_with_cache``: which calls record and
refresh), on dense tensors, with their token arithmetic (``1560`` there is ``T`` here, their
blocks are 3 frames).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from kvpo.models import CachePolicy, FrameCache, generate
from kvpo.models.memory_bank import frame_saliency, refresh_layer
from tests.kvpo.models.reference import plain_qkv, random_model

FPB, SINK, LOCAL, RESIDENT = 3, 3, 9, 15
TOL = dict(atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- their bank, dense
class TheirBank:
    """One layer's ``kv_bank`` dict as their code keeps it: ``k``/``v`` of ``bank_size * T``
    tokens, ``k_new``/``v_new`` of one frame, ``local_end_index``/``global_end_index`` in
    tokens. ``ids`` names the frame in each bank slot (to check which frames are read)."""

    def __init__(self, bank_size, T, H, D):
        self.k = torch.zeros(bank_size * T, H, D)
        self.v = torch.zeros(bank_size * T, H, D)
        self.k_new, self.v_new = torch.zeros(T, H, D), torch.zeros(T, H, D)
        self.ids, self.new_id = [None] * bank_size, None
        self.local_end, self.global_end = 0, 0
        self.T, self.bank_size = T, bank_size

    def apply_before(self, text_q):
        """``_apply_cache_updates_before`` with ``compress_kv_bank`` (one row)."""
        T, end = self.T, self.local_end
        if end < T:
            return
        if end <= self.k.shape[0]:
            self.k[end - T : end], self.v[end - T : end] = self.k_new, self.v_new
            self.ids[(end - T) // T] = self.new_id
            return
        H, D = self.k.shape[1:]
        q = text_q.permute(1, 0, 2)  # [H, L_text, D]
        k = self.k.permute(1, 0, 2)  # [H, L_hist, D]
        scores = torch.bmm(q, k.transpose(1, 2)) * D**-0.5  # [H, L_text, L_hist]
        per_block = scores.mean(1).mean(0).view(-1, T).mean(1)
        _, top = torch.topk(per_block, k=self.bank_size - 1)
        blocks_k = self.k.view(-1, T, H, D)[top].reshape(-1, H, D)
        blocks_v = self.v.view(-1, T, H, D)[top].reshape(-1, H, D)
        self.k = torch.cat([blocks_k, self.k_new])
        self.v = torch.cat([blocks_v, self.v_new])
        self.ids = [self.ids[i] for i in top.tolist()] + [self.new_id]

    def visible(self, current_start, current_end, record_interval, is_recache=False):
        """Bank tokens the attention at ``[current_start, current_end)`` reads."""
        T = self.T
        end_bank = ((current_end // (T * 3) - 1) // record_interval + 1) * T
        local_end_bank = self.local_end + end_bank - self.global_end
        local_start_bank = local_end_bank - (current_end - current_start) // 3
        update = not is_recache and (current_start // (3 * T)) % record_interval == 0
        return min(local_start_bank if update else local_end_bank, self.k.shape[0]), end_bank

    def record(self, k_block, v_block, first_frame, current_start, current_end, interval):
        """``_apply_cache_updates(update_bank=True)`` after a recording context pass."""
        visible, end_bank = self.visible(current_start, current_end, interval)
        local_end_bank = self.local_end + end_bank - self.global_end
        self.k_new, self.v_new = k_block[: self.T].clone(), v_block[: self.T].clone()
        self.new_id = first_frame
        self.local_end, self.global_end = local_end_bank, end_bank


# --------------------------------------------------------------------------- selection
def test_bank_selection_follows_their_compression_and_repeats():
    """Records and refreshes (repeated refreshes while the bank is full) select the frames
    their dense bank holds, in the same order, keys and values included."""
    torch.manual_seed(0)
    T, H, D, size, interval = 4, 2, 8, 3, 2
    frames_k = {f: torch.randn(T, H, D) for f in range(40)}
    frames_v = {f: torch.randn(T, H, D) for f in range(40)}
    text_q = torch.randn(7, H, D)
    theirs = TheirBank(size, T, H, D)
    slots, pending, records, seen = [], None, 0, set()
    for block in range(14):
        start, end = block * 3 * T, (block + 1) * 3 * T
        theirs.apply_before(text_q)
        if records:
            scores = None
            if records > size:
                scores = frame_saliency(text_q, torch.stack([frames_k[f] for f in slots]))
            slots = refresh_layer(slots, pending, records, size, scores)
        visible, _ = theirs.visible(start, end, interval)
        assert theirs.ids[: visible // T] == slots
        seen.add(tuple(slots))
        torch.testing.assert_close(
            theirs.k[:visible], torch.cat([frames_k[f] for f in slots] or [torch.zeros(0, H, D)])
        )
        if block % interval == 0:  # the block's first frame is 3 * block
            f0 = 3 * block
            k_block = torch.cat([frames_k[f0 + i] for i in range(3)])
            v_block = torch.cat([frames_v[f0 + i] for i in range(3)])
            theirs.record(k_block, v_block, f0, start, end, interval)
            pending, records = f0, records + 1
    assert records > size + 2
    assert any(len(set(s)) < len(s) for s in seen)  # a repeated refresh held a frame twice
    assert any(list(s[:-1]) != sorted(s[:-1]) for s in seen)  # saliency reordered the bank


def test_saliency_is_their_attention_score_mean():
    torch.manual_seed(1)
    q, k = torch.randn(5, 3, 8), torch.randn(4, 6, 3, 8)
    full = torch.einsum("jhd,nthd->nhjt", q, k) / math.sqrt(8)
    torch.testing.assert_close(frame_saliency(q, k), full.mean(dim=(1, 2, 3)))


def test_ties_keep_the_lowest_slots():
    """A cleared query (a prompt switch) scores every frame 0: the first slots are kept."""
    assert refresh_layer([4, 5, 6], 9, 5, 3, None) == [4, 5, 9]
    assert refresh_layer([4, 5], 9, 2, 3, None) == [4, 9]
    with pytest.raises(ValueError, match="never refreshed"):
        refresh_layer([4], 9, 3, 3, None)  # the second record skipped its refresh


# --------------------------------------------------------------------------- generation
class _ListAttention(WanAttnProcessor):
    """Self-attention where frame ``q``'s queries attend to the tokens of the frames
    ``lists[q]`` (repeats count twice), each by SDPA over the gathered keys/values; records the
    RoPE'd keys and values of the whole sequence."""

    def __init__(self, T):
        super().__init__()
        self.T, self.lists, self.kv = T, {}, None

    def set_block(self, f0, bank_frames):
        """The block at ``f0`` attends to sink ++ the layer's visible bank ++ window ++ block."""
        block = list(range(f0, f0 + FPB))
        sink = list(range(min(SINK, f0)))
        window = list(range(max(SINK, f0 + FPB - (LOCAL - SINK)), f0))
        self.lists.update({q: sink + bank_frames + window + block for q in block})

    def qkv(self, attn, hidden, rotary_emb):
        """RoPE'd ``q, k, v: [1, N, H, D]`` of the whole sequence (``k, v`` recorded)."""
        q, k, v = plain_qkv(attn, hidden, rotary_emb)
        self.kv = (k.detach(), v.detach())
        return q, k, v

    def listed(self, q, k, v):
        """``[1, N, H, D]``: each listed frame's queries attended (SDPA) to the tokens of its
        ``lists`` frames; zeros for the frames not listed."""
        T = self.T
        out = torch.zeros_like(q)
        for frame, keys in self.lists.items():
            idx = torch.cat([torch.arange(f * T, (f + 1) * T) for f in keys])
            o = F.scaled_dot_product_attention(
                q[:, frame * T : (frame + 1) * T].transpose(1, 2),
                k[:, idx].transpose(1, 2),
                v[:, idx].transpose(1, 2),
            )
            out[:, frame * T : (frame + 1) * T] = o.transpose(1, 2)
        return out

    def __call__(self, attn, hidden, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        out = self.listed(*self.qkv(attn, hidden, rotary_emb))
        return attn.to_out[1](attn.to_out[0](out.flatten(2)))


def _their_call(t, procs, banks, clean, embeds, f0, x_block, timestep, interval):
    """One model call on block ``f0``: frames before it clean at t = 0, the block at
    ``timestep``; the block's frames attend to what ``proc.set_block`` gives each layer's
    visible bank."""
    T = procs[0].T
    start, end = f0 * T, (f0 + FPB) * T
    for proc, bank in zip(procs, banks):
        visible, _ = bank.visible(start, end, interval)
        proc.set_block(f0, bank.ids[: visible // T])
    x = torch.cat([clean[:, :, :f0], x_block], dim=2)
    steps = torch.cat([torch.zeros(1, f0), torch.full((1, FPB), float(timestep))], dim=1)
    return t(x, steps.repeat_interleave(T, 1), embeds, return_dict=False)[0][:, :, f0:]


@torch.no_grad()
def _their_generation(model, embeds, noise, renoise, sigmas, size, interval, proc=_ListAttention):
    """Their block loop on whole-sequence forwards: each frame attends exactly to what it
    attended when it was written (``proc``: sink ++ the layer's visible bank ++ window ++
    block)."""
    t = model.transformer
    T, H = model.config.tokens_per_frame, model.config.num_attention_heads
    procs = [proc(T) for _ in t.blocks]
    saved = [b.attn1.processor for b in t.blocks]
    for b, p in zip(t.blocks, procs):
        b.attn1.set_processor(p)
    context = t.condition_embedder.text_embedder(embeds)
    text_q = [b.attn2.norm_k(b.attn2.to_k(context)).unflatten(2, (H, -1))[0] for b in t.blocks]
    banks = [TheirBank(size, T, H, model.config.attention_head_dim) for _ in t.blocks]
    clean = torch.zeros_like(noise)
    try:
        for f0 in range(0, noise.shape[2], FPB):
            for layer, bank in enumerate(banks):  # q_bank at the first step
                bank.apply_before(text_q[layer])
            x = noise[:, :, f0 : f0 + FPB]
            for s, sigma in enumerate(sigmas):
                v = _their_call(t, procs, banks, clean, embeds, f0, x, sigma * 1000.0, interval)
                x0 = x - sigma * v
                if s + 1 < len(sigmas):
                    x = (1 - sigmas[s + 1]) * x0 + sigmas[s + 1] * renoise[s][:, :, f0 : f0 + FPB]
            clean[:, :, f0 : f0 + FPB] = x0
            _their_call(t, procs, banks, clean, embeds, f0, x0, 0.0, interval)  # context pass
            start, end = f0 * T, (f0 + FPB) * T
            if f0 % (3 * interval) == 0:
                for proc, bank in zip(procs, banks):
                    k, v = proc.kv
                    bank.record(k[0, start:end], v[0, start:end], f0, start, end, interval)
    finally:
        for b, p in zip(t.blocks, saved):
            b.attn1.set_processor(p)
    return clean


def _generation_inputs(frames, seed=5):
    """``noise [1, 3, frames, 16, 16]``, ``renoise [3, 1, 3, frames, 16, 16]`` (one per step
    after the first) and text embeddings ``[1, 5, 32]``, drawn in that order from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, frames, 16, 16, generator=g)
    renoise = torch.randn(3, 1, 3, frames, 16, 16, generator=g)
    return noise, renoise, torch.randn(1, 5, 32, generator=g)


def test_bank_generation_equals_their_dense_transcription():
    model = random_model()
    frames, size, interval = 27, 2, 2
    noise, renoise, embeds = _generation_inputs(frames)
    from kvpo.models import FewStepSampler

    sampler = FewStepSampler()
    sigmas = [float(s) for s in sampler.schedule.sigmas()]
    ref = _their_generation(model, embeds, noise, renoise, sigmas, size, interval)
    outs = {}
    for bank in (size, 0):
        policy = CachePolicy(SINK, LOCAL, RESIDENT, FPB, bank_size=bank, record_interval=interval)
        cache = FrameCache.create(model.config, policy, num_pages=64)
        rows = cache.new_rows(1)
        with torch.no_grad():
            outs[bank] = generate(
                model, cache, rows, model.encode_text(embeds), noise, renoise=renoise
            ).latents
        if bank:
            layers = [cache.bank(rows[0]).layer_frames(i) for i in range(2)]
            assert all(len(f) == size for f in layers)
    torch.testing.assert_close(outs[size], ref, **TOL)
    assert (outs[0] - ref).abs().max() > 1e-3  # the bank changes the video


def test_bank_pages_are_references_and_return_to_the_pool():
    """A lean row releases old frames, its bank keeps their pages (shared, never copied);
    forks share them; freeing every row returns every page."""
    model = random_model()
    policy = CachePolicy(SINK, LOCAL, RESIDENT, FPB, bank_size=2, record_interval=1)
    cache = FrameCache.create(model.config, policy, num_pages=64)
    (row,) = cache.new_rows(1, lean=True)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 3, 18, 16, 16, generator=g)
    renoise = torch.randn(3, 1, 3, 18, 16, 16, generator=g)
    text = model.encode_text(torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        generate(model, cache, [row], text, noise, renoise=renoise)
    bank = cache.bank(row)
    assert bank.records == 6 and bank.pending is not None
    assert len(bank.pages()) >= 3  # the slots of both layers and the pending frame 15
    cache.retain(row, [])  # the row releases every frame; its bank keeps its pages
    assert (
        cache.frames(row) == [] and cache.held_bytes == len(bank.pages()) * cache.store.page_bytes
    )
    for page in bank.pages():
        assert cache.store.refcount(page) == 1
    kids = cache.fork(row, 2)
    assert all(cache.store.refcount(p) == 3 for p in bank.pages())
    assert cache.bank(kids[0]).slots == bank.slots and cache.bank(kids[0]) is not bank
    cache.free([row, *kids])
    assert cache.held_bytes == 0 and cache.store.copied_bytes == 0


def test_policy_bank_keys():
    with pytest.raises(ValueError, match="bank_size >= 0"):
        CachePolicy(bank_size=-1)
    with pytest.raises(ValueError, match="record_interval >= 1"):
        CachePolicy(bank_size=3, record_interval=0)
    policy = CachePolicy(3, 12, 33, 3, bank_size=3, record_interval=3)
    assert [f for f in range(0, 40, 3) if policy.records(f)] == [0, 9, 18, 27, 36]
    assert not CachePolicy().records(0) and CachePolicy().bank_pages(30, 147) == 0
    assert policy.bank_pages(30, 147) == 17 + 1  # 17 records of a 147-frame video, + pending
    assert policy.bank_pages(2, 147) == 2 * 2 + 1 + 1  # each layer keeps 2 of its own
