"""The few-step schedule and update rules against hand computations."""

import pytest
import torch

from kvpo.models import FewStepSampler, FlowSchedule


def test_default_schedule_is_self_forcing_warped_steps():
    sched = FlowSchedule()
    expected = torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0], dtype=torch.float64)
    torch.testing.assert_close(sched.timesteps(), expected)
    torch.testing.assert_close(sched.sigmas(), expected / 1000)
    plain = FlowSchedule(warp=False)
    torch.testing.assert_close(
        plain.sigmas(), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    )


@pytest.mark.parametrize("bad", [(), (500, 750), (1200, 500), (500, 0)])
def test_schedule_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="denoising_steps"):
        FlowSchedule(denoising_steps=bad)


class AffineVelocity:
    """A stand-in model: v = 0.5 x + t / 1000 (records its calls)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, text, start_frame, context):
        self.calls.append((x.clone(), float(t)))
        return 0.5 * x + t / 1000


def test_x0_rule_renoises_the_prediction_with_the_given_noise():
    noise = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    xi = torch.randn(3, 1, 3, 2, 4, 4, dtype=torch.float64)
    model = AffineVelocity()
    x0, traj = FewStepSampler().denoise_block(model, noise, None, 0, renoise=xi, record=True)
    sig = [1.0, 0.9375, 2.5 / 3, 0.625]
    x = noise
    for s in range(4):
        v = 0.5 * x + sig[s]
        torch.testing.assert_close(traj.z[s], x)
        torch.testing.assert_close(traj.v[s], v)
        assert model.calls[s][1] == pytest.approx(1000 * sig[s])
        pred = x - sig[s] * v
        if s < 3:
            x = (1 - sig[s + 1]) * pred + sig[s + 1] * xi[s]
    torch.testing.assert_close(x0, pred)
    torch.testing.assert_close(traj.x0()[-1], pred)


def test_euler_rule_is_the_plain_ode_step():
    noise = torch.randn(1, 3, 1, 4, 4, dtype=torch.float64)
    sched = FlowSchedule(denoising_steps=(1000, 500), warp=False)
    x0, _ = FewStepSampler(sched, rule="euler").denoise_block(AffineVelocity(), noise, None, 0)
    v1 = 0.5 * noise + 1.0
    x1 = noise - 0.5 * v1
    v2 = 0.5 * x1 + 0.5
    torch.testing.assert_close(x0, x1 - 0.5 * v2)


def test_x0_rule_without_renoise_is_an_error():
    with pytest.raises(ValueError, match="renoise"):
        FewStepSampler().denoise_block(AffineVelocity(), torch.randn(1, 3, 1, 4, 4), None, 0)
