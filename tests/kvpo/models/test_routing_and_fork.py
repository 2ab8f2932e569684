"""Routing plans, batching of rows, forks and the prompt-switch recache on the frame cache."""

import pytest
import torch

from kvpo.models import CachePolicy, FrameCache, generate
from tests.kvpo.models.reference import block_of, masked_forward, random_model

TOL = dict(atol=2e-5, rtol=1e-4)
FPB = 2
POLICY = CachePolicy(sink_size=2, local_attn_size=6, resident_frames=10, frames_per_block=FPB)


def _noise(batch, frames, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 3, frames, 16, 16, generator=g)
    return noise, torch.randn(steps - 1, batch, 3, frames, 16, 16, generator=g)


def test_routing_plan_equals_masked_sequence():
    """An arbitrary plan (older frames, out of order) attends exactly to the frames it names."""
    model = random_model()
    frames = 10
    plans = {6: [4, 0, 2], 8: [1, 5, 3, 7]}  # frames attended by the blocks starting there

    def attends(q):
        start = block_of(q, FPB)[0]
        cached = plans.get(
            start, [f for f in range(2) if f < start] + list(range(max(2, start - 2), start))
        )
        return cached + block_of(q, FPB)

    x = torch.randn(1, 3, frames, 16, 16)
    embeds = torch.randn(1, 5, 32)
    ref = masked_forward(model, x, torch.full((1, frames), 0.0), embeds, attends)
    cache = FrameCache.create(model.config, POLICY, num_pages=32)
    (row,), text = cache.new_rows(1), model.encode_text(embeds)
    with torch.no_grad():
        for f0 in range(0, frames, FPB):
            plan = [plans[f0]] if f0 in plans else None
            out = model(
                x[:, :, f0 : f0 + FPB], 0.0, text, f0, cache.view([row], f0, FPB, plans=plan)
            )
            torch.testing.assert_close(out, ref[:, :, f0 : f0 + FPB], **TOL)
            model.write_context(
                x[:, :, f0 : f0 + FPB], text, f0, cache.view([row], f0, FPB, plans=plan, write=True)
            )


def test_identity_routing_equals_no_routing():
    """A plan naming the default window (in a permuted order) gives the unrouted result."""
    model = random_model()
    noise, renoise = _noise(2, 10)
    text = model.encode_text(torch.randn(1, 5, 32))
    results = []
    for routed in (False, True):
        cache = FrameCache.create(model.config, POLICY, num_pages=64)
        rows = cache.new_rows(2)

        def plans(f0):
            window = POLICY.window(f0, FPB)
            return [window[::-1], window[1:] + window[:1]]

        with torch.no_grad():
            gen = generate(
                model, cache, rows, text, noise, renoise=renoise, plans=plans if routed else None
            )
        results.append(gen.latents)
    torch.testing.assert_close(results[1], results[0], **TOL)


def test_batched_rows_equal_rows_one_by_one():
    model = random_model()
    noise, renoise = _noise(3, 8)
    text = model.encode_text(torch.randn(3, 5, 32))
    cache = FrameCache.create(model.config, POLICY, num_pages=96)
    with torch.no_grad():
        batched = generate(
            model, cache, cache.new_rows(3), text, noise, renoise=renoise, record=True
        )
        for b in range(3):
            single = generate(
                model, cache, cache.new_rows(1), text.select([b]), noise[b : b + 1],
                renoise=renoise[:, b : b + 1], record=True,
            )  # fmt: skip
            torch.testing.assert_close(single.latents[0], batched.latents[b], **TOL)
            for tb, ts in zip(batched.trajectories, single.trajectories):
                torch.testing.assert_close(ts.z[:, 0], tb.z[:, b], **TOL)
                torch.testing.assert_close(ts.v[:, 0], tb.v[:, b], **TOL)
        micro = generate(model, cache, cache.new_rows(3), text, noise, renoise=renoise, row_batch=2)
    torch.testing.assert_close(micro.latents, batched.latents, **TOL)


def test_fork_reproduces_parent_bit_for_bit_until_divergence():
    model = random_model()
    noise, renoise = _noise(1, 16, seed=3)
    text = model.encode_text(torch.randn(1, 5, 32))
    cache = FrameCache.create(model.config, POLICY, num_pages=64)
    (parent,) = cache.new_rows(1)
    with torch.no_grad():
        generate(model, cache, [parent], text, noise[:, :, :6], renoise=renoise[:, :, :, :6])
        held = cache.store.num_free_pages
        (child,) = cache.fork(parent, 1)
        assert cache.store.num_free_pages == held  # a fork copies no pages
        same = dict(renoise=renoise[:, :, :, 6:10], start_frame=6)
        a = generate(model, cache, [parent], text, noise[:, :, 6:10], **same).latents
        b = generate(model, cache, [child], text, noise[:, :, 6:10], **same).latents
        assert torch.equal(a, b)
        # diverge: the child gets other noise; the parent must be unaffected by the child's writes
        other, other_re = _noise(1, 6, seed=9)
        c = generate(model, cache, [child], text, other, renoise=other_re, start_frame=10).latents
        cont = dict(renoise=renoise[:, :, :, 10:16], start_frame=10)
        p = generate(model, cache, [parent], text, noise[:, :, 10:16], **cont).latents
        fresh = FrameCache.create(model.config, POLICY, num_pages=64)
        (solo,) = fresh.new_rows(1)
        full = generate(model, fresh, [solo], text, noise, renoise=renoise).latents
    assert not torch.allclose(c, p)
    assert torch.equal(p, full[:, :, 10:16])
    assert torch.equal(a, full[:, :, 6:10])


def _served_kv(cache, row, frames, layer):
    """K/V of ``frames`` as the row's cache serves them: ``[T, H, D]`` each."""
    view = cache.view([row], max(frames) + 1, FPB, plans=[list(frames)])
    pages = cache.store.kv_pages(layer)[view.page_table[0, : len(frames)].long()]
    return pages[:, 0].flatten(0, 1), pages[:, 1].flatten(0, 1)


def test_policy_windows_residency_and_recache_ranges():
    p = CachePolicy()  # LongLive: sink 3, 12 attended (current 3 included), 33 resident
    assert p.window(0, 3) == []
    assert p.window(6, 3) == [0, 1, 2, 3, 4, 5]
    assert p.window(30, 3) == [0, 1, 2, 24, 25, 26, 27, 28, 29]
    assert p.resident_start(30, 3) == 3 and p.resident_start(60, 3) == 33
    assert p.recache_frames(30) == range(18, 30) and p.recache_frames(6) == range(0, 6)
    assert CachePolicy(recache_size=33).recache_frames(60) == range(27, 60)
    assert CachePolicy(recache_size=-1).recache_frames(60) == range(0, 60)
    for bad in (dict(local_attn_size=2), dict(resident_frames=8), dict(recache_size=0),
                dict(local_attn_size=-1)):  # fmt: skip
        with pytest.raises(ValueError):
            CachePolicy(**bad)
