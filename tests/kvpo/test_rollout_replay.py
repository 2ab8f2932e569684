"""Group rollout and replay against one-branch-at-a-time references built from scratch.

The references never fork: each branch's video is generated from frame 0 in its own cache row
with the branch's routing plan, and each replay is written out step by step with explicit model
calls, context passes and an fp64 energy.
"""

import pytest
import torch

from kvpo.method.replay import replay_energies, step_weights
from kvpo.method.rollout import rollout_group
from kvpo.method.routing import RoutingGeometry, chunk_layout, plan_routing
from kvpo.models import (
    CachePolicy,
    CausalWan,
    FewStepSampler,
    FlowSchedule,
    FrameCache,
    generate,
    recache,
    tiny_config,
)
from kvpo.rewards.clips import VideoLayout
from kvpo.streaming import StreamingGenerator, VideoNoise
from kvpo.video_model import VideoModel

F, T, SWITCHES = 3, 15, (6,)
POLICY = CachePolicy(sink_size=1, local_attn_size=6, resident_frames=12, frames_per_block=F)
GEOMETRY = RoutingGeometry(F, 1, 6, 12, 3, 2)  # m = 3, n_random = 2, P = 2 blocks
SCHEDULE = FlowSchedule((1000, 500), shift=2.0)
CTX_SIGMA = 0.25  # context passes read (1 - 0.25) x0 + 0.25 * the group's context noise


def tiny_model() -> CausalWan:
    """One layer, one head, 8 x 8 latents, text dim 16; a visible output projection (seed 0)."""
    torch.manual_seed(0)
    cfg = tiny_config(
        num_layers=1, num_attention_heads=1, latent_height=8, latent_width=8, text_dim=16
    )
    model = CausalWan.from_config(cfg)
    with torch.no_grad():
        model.transformer.proj_out.weight.normal_(std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    texts = [model.encode_text(torch.randn(1, 5, 16)) for _ in range(2)]
    return model, texts


def _cache(model):
    return FrameCache.create(model.config, POLICY, 256)


def _stream(model, rows=4):
    """The generator under test: the model with a ``rows``-row cache (sampler rule x0)."""
    video_model = VideoModel(model, None, None, lambda f: f, (model.config.in_channels, 8, 8))
    layout = VideoLayout(T, SWITCHES)
    return StreamingGenerator(
        video_model, POLICY, SCHEDULE, rule="x0", layout=layout, rows=rows, context_sigma=CTX_SIGMA
    )


def _switches(texts, lo, hi):
    """``{frame: text}`` of the switches in ``(lo, hi)``, written out plainly."""
    return {f: texts[k + 1] for k, f in enumerate(SWITCHES) if lo < f < hi}


def _plan(first_chunk):
    """Chunks (6, 6, 3): the window starts at the switch frame 6; (9, 6): at frame 9."""
    return plan_routing(GEOMETRY, chunk_layout(T, first_chunk, 6), 3, seed=3, step=0)


def _noise(model):
    C = model.config.in_channels
    return VideoNoise.draw(11, (C, T, 8, 8), SCHEDULE.num_steps, "cpu", torch.float32)


def _reference_branch(model, texts, plan, noise, branch):
    """One row from frame 0 (no fork), routed in the window for ``branch`` (None: anchor)."""
    cache = _cache(model)
    rows = cache.new_rows(1)

    def plans(frame):
        if branch is None or not plan.in_window(frame):
            return None
        return [plan.context_frames(branch, frame)]

    with torch.no_grad():
        out = generate(
            model, cache, rows, texts[0], noise.noise, sampler=FewStepSampler(SCHEDULE),
            renoise=noise.renoise, switches=_switches(texts, 0, T),
            plans=plans, record=True, context_noise=noise.context, context_sigma=CTX_SIGMA,
        )  # fmt: skip
    return out


@pytest.mark.parametrize(("row_batch", "first_chunk"), [(0, 6), (2, 9)])
def test_rollout_equals_branches_generated_alone(setup, row_batch, first_chunk):
    """The window starts at the switch frame 6 (recache shared by the group) or at frame 9."""
    model, texts = setup
    plan = _plan(first_chunk)
    assert plan.start_frame == first_chunk
    noise = _noise(model)
    stream = _stream(model)
    cache = stream.cache
    ro = rollout_group(
        stream, texts, plan, noise, policy_frames=plan.geometry.window_frames, end_frame=T,
        row_batch=row_batch,
    )  # fmt: skip
    assert ro.policy_starts == plan.block_starts
    S = SCHEDULE.num_steps
    for g in [*range(3), None]:
        ref = _reference_branch(model, texts, plan, noise, g)
        row = 3 if g is None else g
        torch.testing.assert_close(ro.latents[row], ref.latents[0], rtol=1e-5, atol=1e-5)
        if g is None:
            continue
        for b, start in enumerate(ro.policy_starts):
            traj = ref.trajectories[ref.block_starts.index(start)]
            for s in range(S):
                torch.testing.assert_close(ro.z[g, b * S + s], traj.z[s, 0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(ro.u[g, b * S + s], traj.v[s, 0], rtol=1e-5, atol=1e-5)
    # branches differ from the anchor only through routing
    assert not torch.equal(ro.latents[0], ro.latents[3])
    # only the snapshot row stays alive; its pages are all that is held
    assert cache.rows() == [ro.snapshot]
    cache.free([ro.snapshot])
    assert cache.held_bytes == 0


def _reference_energy(model, texts, ro, branch, weights, eps):
    """fp64 energy of one branch, replayed in its own row rebuilt from the prefix; context
    passes read ``(1 - CTX_SIGMA) x0 + CTX_SIGMA * eps`` (``eps`` the group's context noise)."""
    S, sig = SCHEDULE.num_steps, SCHEDULE.sigmas()
    cache = _cache(model)
    (row,) = cache.new_rows(1)
    fork = ro.fork
    prefix = ro.latents[branch : branch + 1, :, :fork]
    sw = _switches(texts, 0, fork + 1)
    with torch.no_grad():
        for start in range(0, fork, F):  # re-encode the prefix block by block, switches included
            text = texts[sum(1 for s in SWITCHES if s <= start)]
            if start in sw:
                recache(model, cache, [row], prefix[:, :, :start], text, start)
            view = cache.view([row], start, F, write=True)
            x = prefix[:, :, start : start + F]
            x = (1 - CTX_SIGMA) * x + CTX_SIGMA * eps[:, :, start : start + F]
            model.write_context(x, text, start, view)
        if fork in sw:
            recache(model, cache, [row], prefix, sw[fork], fork)
        energy = torch.zeros((), dtype=torch.float64)
        for b, start in enumerate(ro.policy_starts):
            text = texts[sum(1 for s in SWITCHES if s <= start)]
            view = cache.view([row], start, F)
            for s in range(S):
                z = ro.z[branch : branch + 1, b * S + s]
                v = model(z, float(sig[s]) * 1000, text, start, view)
                diff = v.double() - ro.u[branch : branch + 1, b * S + s].double()
                energy += float(weights[s]) * diff.pow(2).mean()
            x0 = z - float(sig[S - 1]) * v
            x0 = (1 - CTX_SIGMA) * x0 + CTX_SIGMA * eps[:, :, start : start + F]
            model.write_context(x0, text, start, cache.view([row], start, F, write=True))
    return energy


def test_replay_energy_against_explicit_replay(setup):
    model, texts = setup
    weights = step_weights(SCHEDULE, "sigma2")
    for first_chunk in (6, 9):
        plan = _plan(first_chunk)
        stream = _stream(model)
        cache = stream.cache
        noise = _noise(model)
        ro = rollout_group(
            stream, texts, plan, noise, policy_frames=plan.geometry.window_frames, end_frame=T,
        )  # fmt: skip
        assert torch.equal(ro.context_noise, noise.context)
        with torch.no_grad():
            energy = replay_energies(stream, ro, texts, weights, branches=[0, 1, 2], grad_steps=1)
        expected = torch.stack(
            [_reference_energy(model, texts, ro, g, weights, noise.context) for g in range(3)]
        )
        torch.testing.assert_close(energy.double(), expected, rtol=1e-4, atol=1e-10)
        assert (energy > 0).all()
        # branch subsets give the same energies; with grad the first step carries the graph
        sub = replay_energies(stream, ro, texts, weights, branches=[2, 0], grad_steps=1)
        assert sub.requires_grad == any(p.requires_grad for p in model.parameters())
        torch.testing.assert_close(sub.detach(), energy[[2, 0]], rtol=1e-5, atol=1e-10)
        assert cache.rows() == [ro.snapshot]
