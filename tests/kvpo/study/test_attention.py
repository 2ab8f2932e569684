"""The attention-mass hook against a hand computation on a tiny model.

The oracle gathers each row's cached keys page by page through the view's page table, appends
the block's own keys and takes an fp64 softmax of ``q . k / sqrt(D)``; a frame's mass is the sum
of its tokens' weights, averaged over heads and queries.
"""

import math

import pytest
import torch

from kvpo.models import CachePolicy, CausalWan, FewStepSampler, FlowSchedule, FrameCache, generate
from kvpo.models import tiny_config as tiny_wan_config
from kvpo.study.attention import ROLES, AttentionMass

F = 3
POLICY = CachePolicy(sink_size=1, local_attn_size=7, resident_frames=12, frames_per_block=F)
NEAREST = 4  # m: the block and the frame before it


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_wan_config(
        num_layers=2, num_attention_heads=2, latent_height=8, latent_width=8, text_dim=16
    )
    model = CausalWan.from_config(cfg).eval()
    with torch.no_grad():
        model.transformer.proj_out.weight.normal_(std=0.3)
    text = model.encode_text(torch.randn(1, 5, 16))
    noise = torch.randn(1, cfg.in_channels, 12, 8, 8)
    return model, text, noise


def _run(model, text, noise, hook):
    """Frames 0..8 unrouted, then block 9 with row 0 routed to [0, 2, 4, 8] and row 1 unrouted
    (default view [0, 6, 7, 8]), one denoising step; returns the block's latents."""
    cache = FrameCache.create(model.config, POLICY, 64)
    rows = cache.new_rows(2)
    sampler = FewStepSampler(FlowSchedule((1000,), shift=1.0), rule="euler")
    with torch.no_grad():
        generate(model, cache, rows, text, noise[:, :, :9], sampler=sampler)
        plans = lambda f: [[0, 2, 4, 8], POLICY.window(f, F)]  # noqa: E731
        out = generate(
            model, cache, rows, text, noise[:, :, 9:], sampler=sampler, start_frame=9,
            plans=plans, context_hook=hook,
        )  # fmt: skip
    return out.latents, cache


def test_hook_leaves_generation_unchanged(setup):
    model, text, noise = setup
    plain, _ = _run(model, text, noise, None)
    hook = AttentionMass(POLICY, sink=1, nearest=NEAREST)
    hook.blocks = {9}
    hooked, _ = _run(model, text, noise, hook)
    assert torch.equal(plain, hooked)
    assert hook.calls and all(n == 1 for n in hook.calls.values())  # 2 layers x 2 rows, 1 step


def test_masses_equal_a_softmax_over_the_gathered_keys(setup):
    model, text, noise = setup
    hook = AttentionMass(POLICY, sink=1, nearest=NEAREST, keep_inputs=True)
    hook.blocks = {9}
    _, cache = _run(model, text, noise, hook)
    assert set(hook.inputs) == {0, 1}
    page = cache.store.page_size
    for layer, (q, k, masses, table, lens, frames) in hook.inputs.items():
        assert frames == [[0, 2, 4, 8], [0, 6, 7, 8]]
        pages = cache.store.kv_pages(layer).double()
        roles = {r: [] for r in ROLES}
        for b in range(2):
            n = int(lens[b]) // page
            assert n == len(frames[b])
            keys = [pages[int(table[b, j]), 0] for j in range(n)] + [k[b].double()]
            keys = torch.cat(keys)  # [tokens, H, D]
            D = q.shape[-1]
            scores = torch.einsum("qhd,khd->hqk", q[b].double(), keys) / math.sqrt(D)
            weights = scores.softmax(-1)  # [H, Lq, tokens]
            want = [weights[:, :, j * page : (j + 1) * page].sum(-1).mean() for j in range(n)]
            want.append(weights[:, :, n * page :].sum(-1).mean())
            want = torch.stack(want)
            torch.testing.assert_close(masses[b, : n + 1].double(), want, atol=1e-5, rtol=1e-4)
            assert float(want.sum()) == pytest.approx(1.0, abs=1e-9)
            # roles at block 9: sink frame 0; nearest 8 (m = 4: frames 8, 9, 10, 11); else middle
            by_role = {"sink": want[0], "nearest": want[n - 1], "self": want[n]}
            by_role["middle"] = want[1 : n - 1].sum()
            for r in ROLES:
                roles[r].append(float(by_role[r]))
        summary = {b: hook.summary([b]) for b in range(2)}
        for r in ROLES:
            for b in range(2):
                assert summary[b][r][layer] == pytest.approx(roles[r][b], abs=1e-5)
