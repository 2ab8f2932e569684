"""``kl_loss_mode: try_kl`` against a plain transcription of the authors'
``_compute_try_kl_anchor_l2`` (models/longlive/trainer/kvpo.py): each policy denoises the
anchor's first blocks on its own trajectory from the anchor's noise, D = mean over (block, step)
of the x0 MSE, gradient only through the first ``anchor_grad_steps`` steps of each block.

The oracle never forks: each block of each policy is replayed in a fresh cache row rebuilt from
the prefix and that policy's own earlier blocks, with explicit model calls, in float64 for D.
"""

import pytest
import torch

from kvpo.method.anchor_kl import AnchorKL, anchor_mse, anchor_noise, anchor_predictions
from kvpo.method.rollout import rollout_group
from kvpo.models import recache
from kvpo.models.lora import active_adapter, add_lora, freeze_copy, lora_parameters
from tests.kvpo.test_rollout_replay import (
    CTX_SIGMA,
    SCHEDULE,
    SWITCHES,
    F,
    _cache,
    _noise,
    _plan,
    _stream,
    tiny_model,
)

S = SCHEDULE.num_steps


@pytest.fixture(scope="module")
def lora_setup():
    """A tiny model whose ``"default"`` adapter (the current policy) differs from ``"ref"``."""
    model = tiny_model()
    add_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(std=0.2)
    freeze_copy(model, "default", "ref")
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    embeds = [torch.randn(1, 5, 16) for _ in range(2)]
    return model, embeds


def _texts(model, embeds, adapter):
    with active_adapter(model, adapter):
        return [model.encode_text(e) for e in embeds]


def _segment(start):
    return sum(1 for s in SWITCHES if s <= start)


def _oracle_x0(model, embeds, adapter, ro, noise, blocks, grad_steps):
    """x0 predictions ``[blocks * S]`` of ``adapter``'s own anchor trajectory (grad only through
    the first ``grad_steps`` steps of each block). The K/V before the fork are the rollout
    policy's (``"ref"`` here; the authors' ``kv_state_before_fork``), those after it the replayed
    policy's own context passes."""
    sig = [float(x) for x in SCHEDULE.sigmas()]
    prefix, fork = ro.prefix, ro.fork
    own: list[torch.Tensor] = []  # this policy's final x0 of each earlier block
    out = []
    texts = {a: _texts(model, embeds, a) for a in ("ref", adapter)}
    for b in range(blocks):
        start = fork + b * F
        past = torch.cat([prefix, *own], dim=2)
        cache = _cache(model)
        (row,) = cache.new_rows(1)
        with torch.no_grad():  # the row: every frame before ``start``, switches re-encoded
            for lo in range(0, start + 1, F):
                writer = "ref" if lo <= fork else adapter  # who wrote the K/V up to ``lo``
                text = texts[writer][_segment(lo)]
                with active_adapter(model, writer):
                    if lo in SWITCHES:
                        recache(model, cache, [row], past[:, :, :lo], text, lo)
                if lo == start:
                    break
                with active_adapter(model, "ref" if lo < fork else adapter):
                    view = cache.view([row], lo, F, write=True)
                    text = texts["ref" if lo < fork else adapter][_segment(lo)]
                    x = past[:, :, lo : lo + F]  # the group's context noise, as the rollout's
                    x = (1 - CTX_SIGMA) * x + CTX_SIGMA * noise.context[:, :, lo : lo + F]
                    model.write_context(x, text, lo, view)
        text = texts[adapter][_segment(start)]
        x = noise.noise[:, :, start : start + F]
        with active_adapter(model, adapter):
            for s in range(S):
                with torch.set_grad_enabled(s < grad_steps):
                    v = model(x, sig[s] * 1000, text, start, cache.view([row], start, F))
                    x0 = x - sig[s] * v
                    out.append(x0)
                    if s + 1 < S:
                        xi = noise.renoise[s, :, :, start : start + F]
                        x = (1 - sig[s + 1]) * x0 + sig[s + 1] * xi
        own.append(x0.detach())
    return out


def _rollout(model, embeds, first_chunk):
    stream = _stream(model)
    plan = _plan(first_chunk)
    noise = _noise(model)
    with torch.no_grad(), active_adapter(model, "ref"):
        ro = rollout_group(
            stream, _texts(model, embeds, "ref"), plan, noise,
            policy_frames=plan.geometry.window_frames, end_frame=15,
        )  # fmt: skip
    return stream, ro, noise


@pytest.mark.parametrize(("first_chunk", "grad_steps"), [(6, 1), (9, 2)])
def test_penalty_value_and_gradient_against_plain_replay(lora_setup, first_chunk, grad_steps):
    """Fork at the switch frame 6 (window 6, 9) or at 9 (window 9, 12); 2 blocks, M = 1 or 2."""
    model, embeds = lora_setup
    stream, ro, noise = _rollout(model, embeds, first_chunk)
    blocks = len(ro.policy_starts)
    assert blocks == 2
    own = anchor_noise(ro, noise, F, blocks)
    with torch.no_grad(), active_adapter(model, "ref"):
        ref = anchor_predictions(stream, ro, _texts(model, embeds, "ref"), own, grad_steps=0)
    params = lora_parameters(model)
    with active_adapter(model, "default"):
        cur = anchor_predictions(
            stream, ro, _texts(model, embeds, "default"), own, grad_steps=grad_steps
        )
    got = anchor_mse(cur, ref)
    grads = torch.autograd.grad(got, list(params.values()), allow_unused=True)

    ref_oracle = _oracle_x0(model, embeds, "ref", ro, noise, blocks, 0)
    cur_oracle = _oracle_x0(model, embeds, "default", ro, noise, blocks, grad_steps)
    terms = [(c.double() - r.double()).pow(2).mean() for c, r in zip(cur_oracle, ref_oracle)]
    expected = torch.stack(terms).sum() / (blocks * S)
    want = torch.autograd.grad(expected, list(params.values()), allow_unused=True)

    assert float(expected.detach()) > 1e-6  # the two policies differ
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-12)
    for name, g, w in zip(params, grads, want):
        g = torch.zeros_like(params[name]) if g is None else g
        w = torch.zeros_like(params[name]) if w is None else w
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-3, atol=1e-9, msg=name)
    assert sum(float(w.abs().sum()) for w in want if w is not None) > 0
    # the gradient follows M: with one step fewer it changes
    if grad_steps > 1:
        fewer = _oracle_x0(model, embeds, "default", ro, noise, blocks, grad_steps - 1)
        d = sum((c.double() - r.double()).pow(2).mean() for c, r in zip(fewer, ref_oracle))
        other = torch.autograd.grad(d / (blocks * S), list(params.values()), allow_unused=True)
        assert any(not torch.allclose(a, b) for a, b in zip(other, want) if a is not None)
    assert stream.cache.rows() == [ro.snapshot]


def test_old_policy_replay_repeats_the_anchor(lora_setup):
    """The rollout policy's replay gives the anchor's own frames (same noise, same context), so
    D = 0 when current and reference are the same weights."""
    model, embeds = lora_setup
    stream, ro, noise = _rollout(model, embeds, 6)
    own = anchor_noise(ro, noise, F, 2)
    with torch.no_grad(), active_adapter(model, "ref"):
        x0 = anchor_predictions(stream, ro, _texts(model, embeds, "ref"), own, grad_steps=0)
    G = ro.latents.shape[0] - 1
    for b, start in enumerate(ro.policy_starts):
        torch.testing.assert_close(
            x0[b * S + S - 1], ro.latents[G : G + 1, :, start : start + F], rtol=1e-5, atol=1e-6
        )
    assert float(anchor_mse(x0, x0)) == 0.0


def test_penalty_scale_blocks_and_errors(lora_setup):
    """``s * kl_coef * D`` with ``s`` the reward gate; blocks capped by the policy window."""
    model, embeds = lora_setup
    stream, ro, noise = _rollout(model, embeds, 9)

    # the learner's prompts go through the video model's text encoder: prompt "i" -> embeds[i]
    stream.model.encode = lambda prompts: model.encode_text(embeds[int(prompts[0])])
    kl = AnchorKL(stream, "ref", blocks=5, grad_steps=1, kl_coef=10.0, gated_scale=0.5)
    kl.stream.noise = lambda seed, num_frames=None: noise  # the rollout's noise
    ref = kl.reference(ro, ["0", "1"], step=0, rank=0)
    assert len(ref.x0) == 2 * S  # min(P = 5, 2 policy blocks)
    for beats, s in ((True, 1.0), (False, 0.5)):
        term, d = kl.penalty(ro, ["0", "1"], ref, beats)
        torch.testing.assert_close(term.detach(), s * 10.0 * d)
        assert term.requires_grad and float(d) > 0
    with pytest.raises(ValueError, match=r"try_kl replays 1..2 blocks"):
        anchor_noise(ro, noise, F, 3)
    with pytest.raises(ValueError, match="equally many terms"):
        anchor_mse(ref.x0, ref.x0[:-1])
