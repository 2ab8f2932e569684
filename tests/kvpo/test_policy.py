"""The KVPO policy objective against hand-written formulas, finite differences and its purpose."""

import math

import pytest
import torch

import kvpo_kernels
from kvpo.method.policy import PolicyConfig, branch_log_probs, policy_loss, reward_scale


def _reference_loss(
    energy, energy_old, energy_ref, adv, s, tau=2.0, clip_low=0.1, clip_high=0.2, kl_coef=10.0
):
    """The method's formula for one group (its default constants), in Python floats."""
    g = len(energy)

    def log_probs(e):
        logits = [-x / tau for x in e]
        top = max(logits)
        norm = top + math.log(sum(math.exp(v - top) for v in logits))
        return [v - norm for v in logits]

    lp, lp_old, lp_ref = log_probs(energy), log_probs(energy_old), log_probs(energy_ref)
    surrogate = 0.0
    for i in range(g):
        rho = math.exp(min(max(lp[i] - lp_old[i], -20.0), 20.0))
        clipped = min(max(rho, 1 - clip_low), 1 + clip_high)
        surrogate += min(rho * adv[i], clipped * adv[i])
    kl = sum(math.exp(lp[i]) * (lp[i] - lp_ref[i]) for i in range(g))
    return s * (-surrogate / g + kl_coef * kl)


def _group(g=8, dtype=torch.float64, spread=0.3):
    energy_old = torch.rand(g, dtype=dtype) * 4 + 1
    energy = energy_old + spread * torch.randn(g, dtype=dtype)
    energy_ref = energy_old + 0.2 * torch.randn(g, dtype=dtype)
    advantages = torch.randn(g, dtype=dtype).clamp(-2.5, 2.5)
    return energy, energy_old, energy_ref, advantages


@pytest.mark.parametrize("beats_anchor,s", [(True, 1.0), (False, 0.5)])
@pytest.mark.parametrize("spread", [0.05, 2.0])  # ratios near 1; ratios clipped on both sides
def test_loss_matches_the_formula(beats_anchor, s, spread):
    energy, energy_old, energy_ref, adv = _group(spread=spread)
    out = policy_loss(energy, energy_old, energy_ref, adv, beats_anchor=beats_anchor)
    expected = _reference_loss(
        energy.tolist(), energy_old.tolist(), energy_ref.tolist(), adv.tolist(), s
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out.diagnostics["scale"] == s
    if spread == 2.0:
        assert 0 < out.diagnostics["clip_fraction"] <= 1


def test_custom_config():
    assert PolicyConfig() == PolicyConfig(2.0, 0.1, 0.2, 20.0, 10.0, 0.5)
    energy, energy_old, energy_ref, adv = _group(spread=1.0)
    cfg = PolicyConfig(tau=0.7, clip_low=0.3, clip_high=0.05, kl_coef=0.5, gated_scale=0.25)
    out = policy_loss(energy, energy_old, energy_ref, adv, beats_anchor=False, config=cfg)
    expected = _reference_loss(
        energy.tolist(), energy_old.tolist(), energy_ref.tolist(), adv.tolist(), 0.25,
        tau=0.7, clip_low=0.3, clip_high=0.05, kl_coef=0.5,
    )  # fmt: skip
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_ratio_is_exactly_one_when_current_equals_old():
    energy = (torch.rand(8) * 5).requires_grad_()
    out = policy_loss(energy, energy.detach().clone(), energy.detach(), torch.randn(8))
    assert torch.equal(out.ratio, torch.ones(8))
    d = out.diagnostics
    assert d["ratio_min"] == d["ratio_max"] == d["ratio_mean"] == 1.0
    assert d["clip_fraction"] == 0.0 and d["approx_kl"] == 0.0 and d["kl_ref"] == 0.0


def test_ratio_is_exactly_one_through_tve_energy():
    """After an old-policy sync, recomputing the energies gives ratio 1 bit for bit."""
    pred = torch.randn(8, 2, 3, 16, 12)
    target = torch.randn(8, 2, 3, 16, 12)
    sigma = torch.tensor([1.0, 0.9375])
    current = kvpo_kernels.tve_energy_x0(pred.clone().requires_grad_(), target, sigma)
    old = kvpo_kernels.tve_energy_x0(pred, target, sigma)
    out = policy_loss(current, old, old, torch.randn(8))
    assert torch.equal(out.ratio, torch.ones(8))


@pytest.mark.parametrize("spread", [0.05, 2.0])
def test_gradient_matches_float64_finite_differences(spread):
    energy, energy_old, energy_ref, adv = _group(spread=spread)
    energy.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e: policy_loss(e, energy_old, energy_ref, adv).loss, (energy,)
    )
    # and an explicit central difference on one coordinate
    (grad,) = torch.autograd.grad(policy_loss(energy, energy_old, energy_ref, adv).loss, energy)
    h, i = 1e-6, 3
    plus, minus = energy.detach().clone(), energy.detach().clone()
    plus[i] += h
    minus[i] -= h
    numeric = (
        policy_loss(plus, energy_old, energy_ref, adv).loss
        - policy_loss(minus, energy_old, energy_ref, adv).loss
    ) / (2 * h)
    assert grad[i].item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


def test_gradient_step_lowers_energy_of_positive_advantage_branches():
    """End to end through tve_energy: one SGD step on a linear velocity model."""
    groups, items, dim = 8, 2, 32
    z = torch.randn(groups, items, 64, dim)
    target = torch.randn(groups, items, 64, dim)
    weight = torch.nn.Parameter(torch.eye(dim) + 0.1 * torch.randn(dim, dim))
    advantages = torch.tensor([2.0, -1.0, 1.5, -2.0, 0.5, -0.5, 1.0, -1.5])
    sigma = torch.tensor([1.0, 0.9375])

    def energies():
        return kvpo_kernels.tve_energy(z @ weight, target, sigma**2)

    with torch.no_grad():
        before = energies()
    out = policy_loss(energies(), before, before, advantages)
    out.loss.backward()
    with torch.no_grad():
        weight -= 0.05 * weight.grad
        after = energies()
    change = after - before
    positive, negative = advantages > 0, advantages < 0
    assert change[positive].mean() < change[negative].mean()
    # the first step (pi = pi_old = pi_ref) is the advantage-weighted energy gradient
    assert out.diagnostics["kl_ref"] == 0.0


def test_leading_group_dims_average_per_group_losses():
    parts = [_group() for _ in range(3)]
    stacked = [torch.stack(x) for x in zip(*parts)]
    beats = torch.tensor([True, False, True])
    out = policy_loss(*stacked, beats_anchor=beats)
    singles = [policy_loss(*p, beats_anchor=bool(b)).loss for p, b in zip(parts, beats.tolist())]
    torch.testing.assert_close(out.loss, torch.stack(singles).mean())


def test_diagnostics_entropy_and_helpers():
    energy = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out = policy_loss(energy, energy, energy, torch.zeros(4))
    assert out.diagnostics["entropy"] == pytest.approx(math.log(4))
    torch.testing.assert_close(branch_log_probs(energy), torch.full((4,), -math.log(4)))
    assert reward_scale(True) == 1.0 and reward_scale(False) == 0.5
    assert torch.equal(reward_scale(torch.tensor([True, False])), torch.tensor([1.0, 0.5]))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"energy_old is \(7,\), energy \(8,\)"):
        policy_loss(torch.zeros(8), torch.zeros(7), torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"advantages are \(2, 4\), energy \(8,\)"):
        policy_loss(torch.zeros(8), torch.zeros(8), torch.zeros(8), torch.zeros(2, 4))
