"""log_prob_sigma_floor f, any value: the translated energy gives the authors' branch policy.

Theirs (``_get_sigma_for_timestep`` and ``_compute_trajectory_log_prob``,
``models/longlive/trainer/kvpo.py``): per block and step,
``-mean((x0_old - x0_theta)^2) / (2 max(sigma, f)^2)``, summed, the branch logits. Here the
logits are ``-E / tau`` with ``E = sum w_s mean((v_theta - u)^2)`` and ``x0 = z - sigma v``.
(Their sigma is the nearest entry of their 1000-step table; here it is the schedule's own.)
"""

import pytest
import torch
import yaml

import kvpo_kernels
from kvpo.method.replay import step_weights
from kvpo.training.config_parse import load_config
from tests.kvpo.test_authors_config import LONGLIVE


@pytest.mark.parametrize(
    "floor, kind", [(0.5, "uniform"), (0.7, "floored"), (0.9, "floored"), (1.0, "sigma2"),
                    (2.0, "sigma2")],
)  # fmt: skip
def test_any_floor_gives_their_logits(tmp_path, floor, kind):
    data = yaml.safe_load(LONGLIVE.read_text())
    data["log_prob_sigma_floor"] = floor
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert cfg.tve_step_weight == kind
    sigmas = cfg.schedule().sigmas().double()  # [S] (1, 0.9375, 0.8333, 0.625)
    G, blocks, S = 8, 2, sigmas.numel()
    gen = torch.Generator().manual_seed(int(floor * 10))
    z = torch.randn(G, blocks, S, 4, 3, 5, generator=gen, dtype=torch.float64)
    v_old = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    v_theta = v_old + 0.3 * torch.randn(z.shape, generator=gen, dtype=torch.float64)
    theirs = torch.zeros(G, dtype=torch.float64)
    for s in range(S):
        sigma = float(sigmas[s])
        x0_old = z[:, :, s] - sigma * v_old[:, :, s]
        x0_theta = z[:, :, s] - sigma * v_theta[:, :, s]
        mse = (x0_old - x0_theta).pow(2).flatten(2).mean(-1)  # [G, blocks]
        theirs -= (mse / (2.0 * max(sigma, floor) ** 2)).sum(-1)
    weights = cfg.step_weights()
    energy = kvpo_kernels.tve_energy(
        v_theta.flatten(1, 2).float(), v_old.flatten(1, 2).float(), weights.repeat(blocks)
    )
    torch.testing.assert_close(-energy.double() / cfg.tau, theirs, rtol=2e-5, atol=1e-6)


def test_floored_needs_a_positive_floor():
    from kvpo.training.config import TrainConfig

    schedule = TrainConfig().schedule()
    with pytest.raises(ValueError, match="'floored' needs a floor > 0, got 0.0"):
        step_weights(schedule, "floored")
    with pytest.raises(ValueError, match="got 'sigma'"):
        step_weights(schedule, "sigma")
