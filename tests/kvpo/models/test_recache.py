"""The prompt-switch recache against a plain one-pass attention oracle (the authors'
``recache_after_switch``: no mask inside a pass, sink + the newest ``local_attn_size - sink``
frames ending at the pass end as keys, the sink kept unless the pass starts at frame 0)."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from kvpo.models import CachePolicy, FrameCache, generate, recache
from tests.kvpo.models.reference import block_of, masked_forward, plain_qkv, random_model

TOL = dict(atol=2e-5, rtol=1e-4)
FPB = 2


class _TwoPromptCross(WanAttnProcessor):
    """Cross-attention where the query tokens flagged in ``old_tokens`` see the old prompt."""

    def __init__(self, old_states: torch.Tensor, old_tokens: torch.Tensor) -> None:
        super().__init__()
        self.old_states, self.old_tokens = old_states, old_tokens

    def __call__(
        self, attn, hidden, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        new = super().__call__(attn, hidden, encoder_hidden_states, None, None)
        old = super().__call__(attn, hidden, self.old_states, None, None)
        return torch.where(self.old_tokens[None, :, None], old, new)


def _oracle(model, latents, new, old, old_frames, attends):
    """Per layer ``(k, v)`` ``[1, F * tokens, H, D]`` of a diffusers forward over ``latents``
    at t = 0, frame ``q`` attending to ``attends(q)``, with the old prompt for ``old_frames``."""
    frames, per_frame = latents.shape[2], model.config.tokens_per_frame
    flags = torch.zeros(frames, dtype=torch.bool)
    flags[list(old_frames)] = True
    blocks = model.transformer.blocks
    old_states = model.transformer.condition_embedder.text_embedder(old)
    saved = [b.attn2.processor for b in blocks]
    try:
        for b in blocks:
            b.attn2.set_processor(_TwoPromptCross(old_states, flags.repeat_interleave(per_frame)))
        _, records = masked_forward(
            model, latents, torch.zeros(1, frames), new, attends, record=True
        )
    finally:
        for b, processor in zip(blocks, saved):
            b.attn2.set_processor(processor)
    return records


def _served_kv(cache, row, frames, layer):
    """K/V of ``frames`` (ascending) as the row's cache serves them: ``[T, H, D]`` each (a
    MemFlow view holds the layer's bank pages after the sink frames: skipped)."""
    frames = list(frames)
    view = cache.view([row], max(frames) + 1, FPB, plans=[frames])
    bank = cache.bank(row)
    skip = len(bank.slots[layer]) if bank is not None else 0
    cut = sum(f < cache.policy.sink_size for f in frames)
    table = view.table(layer)[0][0].long()
    table = torch.cat([table[:cut], table[cut + skip : len(frames) + skip]])
    pages = cache.store.kv_pages(layer)[table]
    return pages[:, 0].flatten(0, 1), pages[:, 1].flatten(0, 1)


def _generate_then_recache(model, policy, switch, old, new, seed=5):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, switch, 16, 16, generator=g)
    renoise = torch.randn(3, 1, 3, switch, 16, 16, generator=g)
    cache = FrameCache.create(model.config, policy, num_pages=128)
    (row,) = cache.new_rows(1)
    with torch.no_grad():
        gen = generate(model, cache, [row], model.encode_text(old), noise, renoise=renoise)
        sink = [_served_kv(cache, row, range(policy.sink_size), l) for l in range(2)]
        frames = recache(model, cache, [row], gen.latents, model.encode_text(new), switch)
    return cache, row, gen.latents, frames, sink


def _check(model, cache, row, records, frames):
    per_frame = model.config.tokens_per_frame
    tokens = torch.cat([torch.arange(f * per_frame, (f + 1) * per_frame) for f in frames])
    for layer, (k_ref, v_ref) in enumerate(records):
        k, v = _served_kv(cache, row, list(frames), layer)
        torch.testing.assert_close(k, k_ref[0, tokens], **TOL)
        torch.testing.assert_close(v, v_ref[0, tokens], **TOL)


def test_recache_attends_to_the_sink_and_the_window_in_one_pass():
    """Switch at 10 (sink 2, local 6): frames 4..9 re-encoded, each attending to the sink (old
    prompt's K/V) and frames 6..9 (new K/V, later frames of the pass included); sink kept."""
    model = random_model()
    policy = CachePolicy(sink_size=2, local_attn_size=6, resident_frames=12, frames_per_block=FPB)
    old, new = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    cache, row, latents, frames, sink = _generate_then_recache(model, policy, 10, old, new)
    assert frames == range(4, 10)

    def attends(q):
        if q < 4:  # the sink as generated (block-causal, old prompt); 2, 3 unused
            return list(range(block_of(q, FPB)[-1] + 1)) if q < 2 else [q]
        return [0, 1, 6, 7, 8, 9]

    records = _oracle(model, latents, new, old, range(4), attends)
    _check(model, cache, row, records, range(4, 10))
    _check(model, cache, row, records, range(2))  # the sink as the oracle generated it
    for layer in range(2):
        k, v = _served_kv(cache, row, [0, 1], layer)
        assert torch.equal(k, sink[layer][0]) and torch.equal(v, sink[layer][1])


def test_recache_from_frame_0_rewrites_the_sink():
    """Switch at 6 <= local_attn_size: frames 0..5 re-encoded with the new prompt, sink
    included, all attending to all (sink + 4 newest = every frame)."""
    model = random_model(seed=1)
    policy = CachePolicy(sink_size=2, local_attn_size=6, resident_frames=12, frames_per_block=FPB)
    old, new = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    cache, row, latents, frames, sink = _generate_then_recache(model, policy, 6, old, new)
    assert frames == range(0, 6)
    records = _oracle(model, latents, new, old, [], lambda q: list(range(6)))
    _check(model, cache, row, records, range(6))
    assert not torch.allclose(_served_kv(cache, row, [0, 1], 0)[0], sink[0][0])


def test_recache_runs_passes_of_21_frames():
    """A full recache of 26 frames (recache_size -1): pass [0, 21) attends to the sink and
    frames 17..20, pass [21, 26) to the sink (re-encoded by the first pass) and 22..25."""
    model = random_model(seed=2)
    policy = CachePolicy(
        sink_size=2, local_attn_size=6, resident_frames=-1, frames_per_block=FPB, recache_size=-1
    )
    old, new = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    cache, row, latents, frames, _ = _generate_then_recache(model, policy, 26, old, new)
    assert frames == range(0, 26)

    def attends(q):
        return [0, 1, 17, 18, 19, 20] if q < 21 else [0, 1, 22, 23, 24, 25]

    records = _oracle(model, latents, new, old, [], attends)
    _check(model, cache, row, records, range(26))


def test_switch_in_generate_equals_recache_then_generate():
    """Generating through a switch (generate(switches=...)) equals recache + generate."""
    model = random_model()
    policy = CachePolicy(sink_size=2, local_attn_size=6, resident_frames=12, frames_per_block=FPB)
    old, new = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 3, 12, 16, 16, generator=g)
    renoise = torch.randn(3, 1, 3, 12, 16, 16, generator=g)
    with torch.no_grad():
        cache = FrameCache.create(model.config, policy, num_pages=64)
        (row,) = cache.new_rows(1)
        first = generate(model, cache, [row], model.encode_text(old), noise[:, :, :10],
                         renoise=renoise[:, :, :, :10])  # fmt: skip
        recache(model, cache, [row], first.latents, model.encode_text(new), 10)
        after = generate(model, cache, [row], model.encode_text(new), noise[:, :, 10:],
                         renoise=renoise[:, :, :, 10:], start_frame=10)  # fmt: skip
        cache2 = FrameCache.create(model.config, policy, num_pages=64)
        (row2,) = cache2.new_rows(1)
        both = generate(model, cache2, [row2], model.encode_text(old), noise, renoise=renoise,
                        switches={10: model.encode_text(new)})  # fmt: skip
    torch.testing.assert_close(both.latents[:, :, 10:], after.latents, **TOL)
    assert cache.frames(row) == list(range(12))  # resident_frames = 12 keeps every frame


# --------------------------------------------------------------------------- MemFlow's rule
def test_memflow_recache_is_one_pass():
    """recache_rule 'memflow' (their MemFlow recache_after_switch: one generator call over
    min(local_attn, switch) frames, every frame with global attention): 26 frames in one pass,
    each attending to all 26; LongLive's passes of 21 give other K/V."""
    model = random_model(seed=2)
    old, new = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    served = {}
    for rule in ("memflow", "longlive"):
        policy = CachePolicy(
            sink_size=2, local_attn_size=-1, resident_frames=-1, frames_per_block=FPB,
            recache_rule=rule,
        )  # fmt: skip
        cache, row, latents, frames, _ = _generate_then_recache(model, policy, 26, old, new)
        assert frames == range(0, 26)
        served[rule] = _served_kv(cache, row, range(21), 1)[0]
        if rule == "memflow":
            records = _oracle(model, latents, new, old, [], lambda q: list(range(26)))
            _check(model, cache, row, records, range(26))
    assert (served["memflow"] - served["longlive"]).abs().max() > 1e-3


class _TheirRecacheAttention(WanAttnProcessor):
    """Their cached self-attention of the recache pass (``CausalWanSelfAttention.forward`` with
    a cache, ``is_recache=True``), one layer, on the whole sequence ``[0, switch)``: the queries
    of frames ``>= first`` attend, without a mask, to ``k_cat = [k_sink, k_bank, k_local]``:
    ``outer`` (the cached sink and the bank, ``[n, H, D]`` each) then the tokens of the
    ``local`` frames of this sequence; other frames attend to themselves (unused). Records the
    sequence's RoPE'd keys and values."""

    def __init__(self, T, first, outer, local):
        super().__init__()
        self.T, self.first, self.outer, self.local, self.kv = T, first, outer, local, None

    def __call__(self, attn, hidden, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        T = self.T
        q, k, v = plain_qkv(attn, hidden, rotary_emb)
        self.kv = (k.detach(), v.detach())
        idx = torch.cat([torch.arange(f * T, (f + 1) * T) for f in self.local])
        k_cat = torch.cat([self.outer[0][None], k[:, idx]], dim=1)
        v_cat = torch.cat([self.outer[1][None], v[:, idx]], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=torch.eye(q.shape[1] // T, dtype=torch.bool).repeat_interleave(T, 0)
            .repeat_interleave(T, 1),
        )  # fmt: skip
        lo = self.first * T
        out[:, :, lo:] = torch.nn.functional.scaled_dot_product_attention(
            q[:, lo:].transpose(1, 2), k_cat.transpose(1, 2), v_cat.transpose(1, 2)
        )
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


@torch.no_grad()
def _their_memflow_recache(model, latents, new, first, outer, local):
    """Per layer ``(k, v)`` ``[1, F * T, H, D]`` of their one recache pass over ``latents``
    (t = 0, the new prompt): the frames ``>= first`` as :class:`_TheirRecacheAttention`."""
    t, T = model.transformer, model.config.tokens_per_frame
    procs = [_TheirRecacheAttention(T, first, kv, local) for kv in outer]
    saved = [b.attn1.processor for b in t.blocks]
    try:
        for b, p in zip(t.blocks, procs):
            b.attn1.set_processor(p)
        steps = torch.zeros(1, latents.shape[2] * T)
        t(latents, steps, new, return_dict=False)
    finally:
        for b, p in zip(t.blocks, saved):
            b.attn1.set_processor(p)
    return [p.kv for p in procs]


@pytest.mark.parametrize("bank_size", [3, 2])
def test_memflow_recache_with_bank_equals_their_one_pass(bank_size):
    """Switch at 10 (sink 2, local 6, blocks of 2, a record every 2 blocks: frames 0, 4, 8):
    frames 4..9 re-encoded in one pass, each attending to the cached sink (first prompt), the
    whole bank after its refresh with a cleared query (their ``q_bank`` with the zeroed
    cross-attention cache: slot ``records - 1`` while it fits, else the ``bank_size - 1`` first
    slots by the tie rule, then the pending frame 8 as recorded) and the new K/V of 6..9."""
    model = random_model(seed=3)
    policy = CachePolicy(
        sink_size=2, local_attn_size=6, resident_frames=12, frames_per_block=FPB,
        bank_size=bank_size, record_interval=2, recache_rule="memflow",
    )  # fmt: skip
    old, new = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 3, 10, 16, 16, generator=g)
    renoise = torch.randn(3, 1, 3, 10, 16, 16, generator=g)
    cache = FrameCache.create(model.config, policy, num_pages=128)
    (row,) = cache.new_rows(1)
    with torch.no_grad():
        gen = generate(model, cache, [row], model.encode_text(old), noise, renoise=renoise)
    bank = cache.bank(row)
    assert bank.records == 3 and bank.frames[bank.pending] == 8
    outer, expected = [], []
    for layer in range(2):  # their cache before the pass: sink and bank K/V, per layer
        slots = bank.slots[layer]  # their slot records - 1 while it fits, else tied top-k
        slots = (slots if bank.records <= bank_size else slots[: bank_size - 1]) + [bank.pending]
        expected.append([bank.frames[p] for p in slots])
        pages = cache.store.kv_pages(layer)[torch.tensor(slots)].clone()  # [n, 2, T, H, D]
        k_sink, v_sink = _served_kv(cache, row, [0, 1], layer)
        outer.append(
            (torch.cat([k_sink, pages[:, 0].flatten(0, 1)]),
             torch.cat([v_sink, pages[:, 1].flatten(0, 1)]))
        )  # fmt: skip
    assert expected == ([[0, 4, 8]] * 2 if bank_size == 3 else [[0, 8]] * 2)
    with torch.no_grad():
        frames = recache(model, cache, [row], gen.latents, model.encode_text(new), 10)
    assert frames == range(4, 10)
    assert [cache.bank(row).layer_frames(layer) for layer in range(2)] == expected
    records = _their_memflow_recache(model, gen.latents, new, 4, outer, [6, 7, 8, 9])
    _check(model, cache, row, records, range(4, 10))
    no_bank = [(k[: 2 * 16], v[: 2 * 16]) for k, v in outer]  # the sink only
    without = _their_memflow_recache(model, gen.latents, new, 4, no_bank, [6, 7, 8, 9])
    assert (without[1][0] - records[1][0]).abs().max() > 1e-3  # the bank changes the K/V


def test_memflow_recache_rule_is_checked():
    with pytest.raises(ValueError, match="recache_rule must be one of"):
        CachePolicy(recache_rule="causal")
    with pytest.raises(ValueError, match="no full-cache option"):
        CachePolicy(recache_size=-1, recache_rule="memflow")
