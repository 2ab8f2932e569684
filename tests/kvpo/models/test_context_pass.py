"""The context pass's input: the authors' ``scheduler.add_noise(x0, eps, context_noise)`` with
their FlowMatchScheduler table, written out plainly here."""

import pytest
import torch

from kvpo.models import CachePolicy, FlowSchedule, FrameCache, generate
from kvpo.streaming import VideoNoise, stream_from_config
from kvpo.training.config import TrainConfig
from kvpo.video_model import VideoModel
from tests.kvpo.models.reference import random_model


def _their_sigma(shift, timestep):
    """FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000) and the
    sigma add_noise picks (fp32, as their tables)."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    return float(sigmas[torch.argmin((timesteps - timestep).abs())])


@pytest.mark.parametrize("shift", [5.0, 3.0, 1.0])
@pytest.mark.parametrize("timestep", [0, 3, 5, 100, 250, 999])
def test_table_sigma_is_their_scheduler_table(shift, timestep):
    ours = FlowSchedule(shift=shift).table_sigma(timestep)
    assert ours == pytest.approx(_their_sigma(shift, timestep), rel=1e-6, abs=1e-9)


def test_table_sigma_at_context_noise_0():
    """shift 5: the nearest timestep to 0 is 4.98 (the table's last entry), sigma 0.00498."""
    s = 1 / 1000
    assert FlowSchedule(shift=5.0).table_sigma(0) == pytest.approx(5 * s / (1 + 4 * s))
    assert FlowSchedule(shift=5.0).table_sigma(0) == pytest.approx(0.0049800797, abs=1e-9)
    assert FlowSchedule(shift=1.0).table_sigma(0) == pytest.approx(0.001)


def test_context_pass_reads_the_noised_prediction(monkeypatch):
    """generate's context pass input is (1 - sigma) x0 + sigma * eps per block, eps shared by
    the rows (one noise for the group); with no noise it is x0 itself."""
    model = random_model()
    policy = CachePolicy(sink_size=2, local_attn_size=6, resident_frames=12, frames_per_block=2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 3, 4, 16, 16, generator=g)
    renoise = torch.randn(3, 1, 3, 4, 16, 16, generator=g)
    eps = torch.randn(1, 3, 4, 16, 16, generator=g)
    text = model.encode_text(torch.randn(1, 5, 32))
    seen = []
    write = model.write_context

    def spy(latents, *args, **kwargs):
        seen.append(latents.clone())
        return write(latents, *args, **kwargs)

    monkeypatch.setattr(model, "write_context", spy)
    outs = []
    for ctx in (eps, None):
        seen.clear()
        cache = FrameCache.create(model.config, policy, num_pages=64)
        with torch.no_grad():
            out = generate(
                model, cache, cache.new_rows(2), text, noise, renoise=renoise,
                context_noise=ctx, context_sigma=0.3,
            ).latents  # fmt: skip
        for b, x_in in enumerate(seen):
            x0 = out[:, :, 2 * b : 2 * b + 2].double()
            if ctx is None:
                expected = x0
            else:
                expected = 0.7 * x0 + 0.3 * eps[:, :, 2 * b : 2 * b + 2].double().expand_as(x0)
            torch.testing.assert_close(x_in.double(), expected, rtol=1e-6, atol=1e-6)
        outs.append(out)
    assert len(seen) == 2
    # the first block is the same; the second attends to the first's K/V, which differ
    torch.testing.assert_close(outs[0][:, :, :2], outs[1][:, :, :2])
    assert not torch.allclose(outs[0][:, :, 2:], outs[1][:, :, 2:], atol=1e-4)
    with pytest.raises(ValueError, match="context_noise is"):
        generate(model, cache, cache.new_rows(1), text, noise, renoise=renoise,
                 context_noise=eps[:, :, :2], context_sigma=0.3)  # fmt: skip


def test_video_noise_draws_the_context_noise_third():
    shape, steps = (3, 4, 2, 2), 4
    got = VideoNoise.draw(7, shape, steps, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(1, *shape, generator=gen)
    renoise = torch.randn(steps - 1, 1, *shape, generator=gen)
    context = torch.randn(1, *shape, generator=gen)
    assert torch.equal(got.noise, noise) and torch.equal(got.renoise, renoise)
    assert torch.equal(got.context, context)
    both = VideoNoise.stack([got, VideoNoise.draw(8, shape, steps, "cpu", torch.float32)])
    assert both.context.shape == (2, *shape) and torch.equal(both.context[:1], context)
    assert torch.equal(both.frames(1, 3)[2], both.context[:, :, 1:3])


@pytest.mark.parametrize("add", [True, False])
def test_config_sets_the_streams_context_sigma(add):
    model = random_model()
    video = VideoModel(model, None, None, lambda f: f, (3, 16, 16))
    cfg = TrainConfig(context_add_noise=add)
    stream = stream_from_config(video, cfg, rows=1)
    expected = _their_sigma(cfg.model_kwargs.timestep_shift, cfg.context_noise) if add else 0.0
    assert stream.context_sigma == pytest.approx(expected, rel=1e-6)
    eps = torch.ones(1)
    assert (stream.context_noise(eps) is eps) == add
