"""The causal model against diffusers' own forward (one block; whole sequences under a mask)."""

import pytest
import torch

from kvpo.models import CachePolicy, FrameCache
from tests.kvpo.models.reference import block_of, masked_forward, random_model

TOL = dict(atol=2e-5, rtol=1e-4)


def test_one_block_without_history_equals_diffusers():
    model = random_model()
    x = torch.randn(2, 3, 3, 16, 16)
    t = torch.tensor([900.0, 250.0])
    embeds = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model.transformer(x, t, embeds, return_dict=False)[0]
        out = model(x, t, model.encode_text(embeds))
        cache = FrameCache.create(model.config, CachePolicy(), num_pages=8)
        rows = cache.new_rows(2)
        paged = model(x, t, model.encode_text(embeds), 0, cache.view(rows, 0, 3))
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(paged, ref, **TOL)
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize("per_frame_t", [False, True])
def test_cached_blocks_equal_block_causal_sequence(per_frame_t):
    """Each block written at its own timestep, then the next attends to all earlier blocks."""
    model = random_model()
    fpb, blocks, batch = 2, 4, 2
    frames = fpb * blocks
    x = torch.randn(batch, 3, frames, 16, 16)
    t = torch.rand(batch, frames if per_frame_t else blocks) * 1000
    t = t if per_frame_t else t.repeat_interleave(fpb, dim=1)
    embeds = torch.randn(batch, 5, 32)
    ref = masked_forward(model, x, t, embeds, lambda q: list(range(block_of(q, fpb)[-1] + 1)))
    policy = CachePolicy(sink_size=0, local_attn_size=-1, resident_frames=-1, frames_per_block=fpb)
    cache = FrameCache.create(model.config, policy, num_pages=64)
    rows, text = cache.new_rows(batch), model.encode_text(embeds)
    with torch.no_grad():
        for f0 in range(0, frames, fpb):
            blk, tb = x[:, :, f0 : f0 + fpb], t[:, f0 : f0 + fpb]
            out = model(blk, tb, text, f0, cache.view(rows, f0, fpb))
            torch.testing.assert_close(out, ref[:, :, f0 : f0 + fpb], **TOL)
            model.write_context(blk, text, f0, cache.view(rows, f0, fpb, write=True), timestep=tb)
    assert cache.frames(rows[0]) == list(range(frames))


def test_sink_and_window_attend_exactly_sink_and_newest_frames():
    """Default views under local attention equal a sequence masked to sink + newest frames."""
    model = random_model()
    policy = CachePolicy(sink_size=2, local_attn_size=6, resident_frames=8, frames_per_block=2)
    blocks, fpb = 6, 2
    frames = blocks * fpb
    x = torch.randn(1, 3, frames, 16, 16)
    t = torch.full((1, frames), 400.0)
    embeds = torch.randn(1, 5, 32)

    def attends(q):  # written independently of CachePolicy.window: the frame-level rule
        start = block_of(q, fpb)[0]
        sink = [f for f in range(2) if f < start]
        newest = [f for f in range(start - 2, start) if f >= 2]
        return sink + newest + block_of(q, fpb)

    ref = masked_forward(model, x, t, embeds, attends)
    cache = FrameCache.create(model.config, policy, num_pages=64)
    (row,), text = cache.new_rows(1), model.encode_text(embeds)
    free_before = cache.store.num_free_pages
    with torch.no_grad():
        for f0 in range(0, frames, fpb):
            view = cache.view([row], f0, fpb)
            expected = sorted(set(attends(f0)) - set(block_of(f0, fpb)))
            assert int(view.ctx_lens[0]) == len(expected) * model.config.tokens_per_frame
            resident = [f for f in range(f0) if f < 2 or f >= f0 + fpb - (8 - 2)]
            assert cache.frames(row) == resident
            out = model(x[:, :, f0 : f0 + fpb], 400.0, text, f0, view)
            torch.testing.assert_close(out, ref[:, :, f0 : f0 + fpb], **TOL)
            model.write_context(
                x[:, :, f0 : f0 + fpb], text, f0, cache.view([row], f0, fpb, write=True), 400.0
            )
    assert free_before - cache.store.num_free_pages == len(cache.frames(row)) == 8


class _GatheredSDPA:
    """Oracle context: the view's cached frames gathered densely (detached), then SDPA."""

    writes = False

    def __init__(self, view):
        self.view = view

    def attend(self, layer, q, k, v):
        pages = self.view.store.kv_pages(layer)[self.view.page_table[0].long()]
        k_ctx, v_ctx = pages[:, 0].flatten(0, 1)[None], pages[:, 1].flatten(0, 1)[None]
        keys, values = torch.cat([k_ctx, k], 1), torch.cat([v_ctx, v], 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        )
        return out.transpose(1, 2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_through_the_cached_forward(checkpointing):
    model = random_model()
    policy = CachePolicy(sink_size=1, local_attn_size=5, resident_frames=8, frames_per_block=2)
    cache = FrameCache.create(model.config, policy, num_pages=16)
    (row,) = cache.new_rows(1)
    text_embeds = torch.randn(1, 5, 32)
    x = torch.randn(1, 3, 6, 16, 16)
    with torch.no_grad():
        text = model.encode_text(text_embeds)
        for f0 in (0, 2):
            model.write_context(
                x[:, :, f0 : f0 + 2], text, f0, cache.view([row], f0, 2, write=True)
            )
    grads = []
    for context in ("paged", "dense"):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing and context == "paged"
        view = cache.view([row], 4, 2)
        ctx = view if context == "paged" else _GatheredSDPA(view)
        out = model(x[:, :, 4:6], 700.0, model.encode_text(text_embeds), 4, ctx)
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
