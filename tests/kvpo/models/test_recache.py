"""The prompt-switch recache against a plain one-pass attention oracle (the authors'
``recache_after_switch``: no mask inside a pass, sink + the newest ``local_attn_size - sink``
frames ending at the pass end as keys, the sink kept unless the pass starts at frame 0)."""

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from kvpo.models import CachePolicy, FrameCache, generate, recache
from tests.kvpo.models.reference import block_of, masked_forward, random_model

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
    """K/V of ``frames`` as the row's cache serves them: ``[T, H, D]`` each."""
    view = cache.view([row], max(frames) + 1, FPB, plans=[list(frames)])
    pages = cache.store.kv_pages(layer)[view.page_table[0, : len(frames)].long()]
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
