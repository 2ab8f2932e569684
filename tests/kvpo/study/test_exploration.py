"""Exploration modes of the group rollout on a tiny toy model (random weights, real code path).

Checked against plain computations: the injected noise is ``scale * eps`` drawn from each
branch's own generator, added before steps 1-3 (read back from the recorded Euler trajectory);
the branch initial noise is ``sqrt(1 - s^2) eps + s delta_g``; a branch equals the same video
generated alone from frame 0 with its noise written out in the test; every mode is reproducible
and leaves the anchor bit for bit as in ``kv_routing``; noise injection at scale 0 is the
unperturbed rollout bit for bit.
"""

import math

import pytest
import torch

from kvpo.models import FewStepSampler, generate
from kvpo.streaming import branch_seed, group_seed
from kvpo.training.config import TrainConfig
from kvpo.training.distributed import DistInfo
from kvpo.training.trainer import build_learner
from tests.kvpo.trainer_fixtures import tiny_config, tiny_generator_dir

MODES = ("kv_routing", "noise_injection", "initial_noise", "kv_routing+noise")
# chunks [0, 6) and [6, 12): a fork at 6 leaves frames 9..11 of the fork chunk after the window;
# the tiny model has 2 denoising steps, so noise is injected before step 1 only
LAYOUT = ("streaming_min_new_frame=6", "noise_inject_at_steps=[1]")
STEP = 2  # its plan forks at frame 6 (asserted)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


@pytest.fixture(scope="module")
def learner(weights, tmp_path_factory):
    cfg = tiny_config(weights, tmp_path_factory.mktemp("run"), *LAYOUT)
    return build_learner(cfg, DistInfo())


@pytest.fixture(scope="module")
def base(learner):
    """The default (kv_routing) rollout of STEP."""
    return _rollout(learner, "kv_routing")


def _rollout(learner, mode, step=STEP, **keys):
    cfg = learner.cfg
    learner.exploration = type(learner.exploration)(
        mode=mode,
        injection_scale=keys.get("scale", cfg.noise_injection_scale),
        inject_at_steps=tuple(cfg.noise_inject_at_steps),
        initial_mix=keys.get("mix", cfg.initial_noise_mix),
    )
    try:
        ro = learner.rollout(step, learner.prompts.train(step, 0), 0)
        learner.cache.free([ro.snapshot])
    finally:
        learner.exploration = cfg.exploration_config()
    return ro


def _branch_draws(learner, step, g, frames, count):
    """``count`` standard-normal draws ``[C, frames, H, W]`` of branch ``g``'s generator."""
    C, H, W = learner.video_model.latent_shape
    gen = torch.Generator().manual_seed(branch_seed(group_seed(learner.cfg.seed, step, 0), g))
    return [torch.randn(C, frames, H, W, generator=gen) for _ in range(count)]


def test_config_keys_and_defaults(learner):
    cfg = learner.cfg
    assert cfg.exploration == "kv_routing"
    assert (cfg.noise_injection_scale, cfg.initial_noise_mix) == (0.2, 0.3)
    assert TrainConfig().noise_inject_at_steps == [1, 2, 3]  # the authors' steps of 4
    plan = learner.plan(STEP, 0)
    assert (plan.start_frame, learner.chunks[plan.chunk_index].end_frame) == (6, 12)


@pytest.mark.parametrize("mode", MODES)
def test_mode_is_reproducible_and_keeps_the_anchor(learner, base, mode):
    first, again = _rollout(learner, mode), _rollout(learner, mode)
    assert torch.equal(first.latents, again.latents)
    assert torch.equal(first.z, again.z) and torch.equal(first.u, again.u)
    G = learner.cfg.K
    assert torch.equal(first.latents[G], base.latents[G]), "the anchor must not change"
    fork = first.fork
    assert torch.equal(first.latents[:, :, :fork], base.latents[:, :, :fork]), "shared prefix"
    for g in range(G):  # every branch explores: it differs from the anchor after the fork
        assert not torch.equal(first.latents[g, :, fork:], first.latents[G, :, fork:])
    other = _rollout(learner, mode, step=STEP + 1)
    assert not torch.equal(other.latents, first.latents)


def test_noise_injection_at_scale_zero_is_the_unperturbed_rollout(learner, base):
    ro = _rollout(learner, "noise_injection", scale=0.0)
    G = learner.cfg.K
    for g in range(G):  # unrouted, unperturbed: every branch is the anchor, bit for bit
        assert torch.equal(ro.latents[g], ro.latents[G])
    assert torch.equal(ro.latents[G], base.latents[G])
    both = _rollout(learner, "kv_routing+noise", scale=0.0)
    assert torch.equal(both.latents, base.latents)
    assert torch.equal(both.z, base.z) and torch.equal(both.u, base.u)


def test_injected_noise_is_scale_times_the_branch_draws_before_step_1(learner):
    """Euler: the next input is ``z_s + (sigma_{s+1} - sigma_s) u_s`` plus what was injected."""
    ro = _rollout(learner, "noise_injection")
    sig = learner.stream.schedule.sigmas().tolist()
    S, F = len(sig), learner.stream.frames_per_block
    assert S == 2 and learner.cfg.noise_inject_at_steps == [1]
    for g in range(learner.cfg.K):
        (eps,) = _branch_draws(learner, STEP, g, 6, 1)
        for b in range(len(ro.policy_starts)):  # the window's block(s): frames 6..8
            z0, u0, z1 = ro.z[g, b * S], ro.u[g, b * S], ro.z[g, b * S + 1]
            added = z1 - (z0 + (sig[1] - sig[0]) * u0)
            torch.testing.assert_close(added, 0.2 * eps[:, b * F : b * F + F], atol=1e-6, rtol=0)


def test_branch_initial_noise_mixes_shared_and_own_noise(learner):
    ro = _rollout(learner, "initial_noise")
    shared = learner.stream.noise(group_seed(learner.cfg.seed, STEP, 0)).noise[0]
    s = 0.3
    for g in range(learner.cfg.K):
        (delta,) = _branch_draws(learner, STEP, g, 6, 1)
        want = math.sqrt(1 - s * s) * shared[:, 6:9] + s * delta[:, :3]
        torch.testing.assert_close(ro.z[g, 0], want, atol=1e-6, rtol=0)  # step 0 of block 6


@pytest.mark.parametrize("mode", ["noise_injection", "initial_noise"])
def test_branch_equals_its_video_generated_alone(learner, mode):
    """Branch 1 of the forked, batched rollout = one row from frame 0 whose noise is written
    out here: shared noise outside the fork chunk [6, 12), the branch's own inside (the context
    passes read the group's shared context noise)."""
    ro = _rollout(learner, mode)
    stream, g, cfg = learner.stream, 1, learner.cfg
    noise = stream.noise(group_seed(cfg.seed, STEP, 0))
    init = noise.noise.clone()
    inject = None
    (draw,) = _branch_draws(learner, STEP, g, 6, 1)
    if mode == "initial_noise":
        init[0, :, 6:12] = math.sqrt(1 - 0.09) * init[0, :, 6:12] + 0.3 * draw
    else:
        inject = {1: torch.zeros_like(init)}
        inject[1][0, :, 6:12] = 0.2 * draw
    texts = stream.segment_texts(learner.prompts.train(STEP, 0))
    rows = stream.cache.new_rows(1)
    try:
        with torch.no_grad():
            alone = generate(
                stream.wan, stream.cache, rows, texts[0], init,
                sampler=FewStepSampler(stream.schedule, rule=cfg.sampler_rule),
                switches={f: texts[k + 1] for k, f in enumerate(cfg.switch_frames)},
                inject=inject, context_noise=noise.context, context_sigma=stream.context_sigma,
            )  # fmt: skip
    finally:
        stream.cache.free(rows)
    assert stream.context_sigma > 0  # the authors' context pass (context_add_noise: true)
    torch.testing.assert_close(ro.latents[g], alone.latents[0], atol=1e-5, rtol=1e-5)
    assert not torch.equal(ro.latents[g, :, 9:12], ro.latents[cfg.K, :, 9:12])


def test_bad_exploration_keys_stop_before_work(weights, tmp_path):
    from kvpo.training.config import ConfigError

    for extra, match in (
        ("noise_injection_scale=-1", "noise_injection_scale"),
        ("initial_noise_mix=1.5", "initial_noise_mix"),
        ("noise_inject_at_steps=[1, 2]", "noise_inject_at_steps"),  # the tiny sampler: 2 steps
    ):
        cfg = tiny_config(weights, tmp_path, "exploration=noise_injection", extra)
        with pytest.raises(ConfigError, match=match):
            cfg.exploration_config()
