"""tve_energy and tve_energy_x0 on every backend against an fp64 oracle (a loop over items)."""

import pytest
import torch

import kvpo_kernels
from kvpo_kernels.ops.tve import item_views
from tests.oracle import TOLERANCES, assert_close_to_oracle, max_abs_err

BACKENDS = ("torch", "triton")


def _oracle(pred, target, weight=None, reduction="mean"):
    """fp64 energies: one item at a time, ``sum_k w[g, k] * reduce((p - t)^2)``."""
    groups, items = pred.shape[:2]
    out = torch.zeros(groups, dtype=torch.float64)
    for g in range(groups):
        for k in range(items):
            sq = (pred[g, k].double().cpu() - target[g, k].double().cpu()) ** 2
            value = sq.mean() if reduction == "mean" else sq.sum()
            if weight is not None:
                w = weight[k] if weight.dim() == 1 else weight[g, k]
                value = value * float(w)
            out[g] += value
    return out


def _eager(pred, target, weight=None):
    """The expression a user would write, in the inputs' dtype."""
    per_item = ((pred - target) ** 2).flatten(2).mean(-1)
    return (per_item * weight.to(pred.dtype)).sum(1) if weight is not None else per_item.sum(1)


def _weights(kind, groups, items, device):
    if kind == "none":
        return None
    shape = (items,) if kind == "K" else (groups, items)
    return torch.rand(shape, device=device) + 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_kind", ["none", "K", "GK"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_energy_and_grad_match_fp64_oracle(backend, weight_kind, reduction, device):
    groups, items, shape = 3, 4, (3, 5, 7)
    pred = torch.randn(groups, items, *shape, device=device, requires_grad=True)
    target = torch.randn(groups, items, *shape, device=device)
    weight = _weights(weight_kind, groups, items, device)
    energy = kvpo_kernels.tve_energy(pred, target, weight, reduction=reduction, backend=backend)
    assert energy.dtype == torch.float32 and energy.shape == (groups,)
    expected = _oracle(pred.detach(), target, weight, reduction)
    torch.testing.assert_close(energy.double().cpu(), expected, **TOLERANCES[torch.float32])

    upstream = torch.randn(groups, device=device)
    (grad,) = torch.autograd.grad(energy, pred, upstream)
    p64 = pred.detach().double().requires_grad_()
    ref = _oracle(p64, target, weight, reduction)
    (expected_grad,) = torch.autograd.grad(ref, p64, upstream.double().cpu())
    assert grad.dtype == torch.float32 and grad.is_contiguous()
    torch.testing.assert_close(grad.double().cpu(), expected_grad, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ("torch",))
def test_gradcheck_fp64(backend, device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    pred, target = torch.randn(2, 3, 4, 5, **kw), torch.randn(2, 3, 4, 5, **kw)
    weight = torch.rand(2, 3, **kw)
    assert torch.autograd.gradcheck(
        lambda p, t, w: kvpo_kernels.tve_energy(p, t, w, backend=backend), (pred, target, weight)
    )


def test_x0_form_equals_velocity_form(device):
    groups, items, shape = 2, 4, (3, 6)
    sigma = torch.tensor([1.0, 0.9375, 0.8333, 0.625], device=device)
    z = torch.randn(groups, items, *shape, device=device)
    x0_pred = torch.randn(groups, items, *shape, device=device)
    x0_target = torch.randn(groups, items, *shape, device=device)
    view = sigma.view(1, items, 1, 1)
    v_pred, v_target = (z - x0_pred) / view, (z - x0_target) / view
    weight = torch.rand(items, device=device) + 0.5
    velocity = kvpo_kernels.tve_energy(v_pred, v_target, weight)
    x0 = kvpo_kernels.tve_energy_x0(x0_pred, x0_target, sigma, weight)
    torch.testing.assert_close(x0, velocity, rtol=1e-5, atol=1e-6)
    # default weights sigma^2: the plain sum of x0 mean squared errors
    default = kvpo_kernels.tve_energy_x0(x0_pred, x0_target, sigma)
    torch.testing.assert_close(default, _oracle(x0_pred, x0_target).float().to(device))
    torch.testing.assert_close(
        kvpo_kernels.tve_energy(v_pred, v_target, sigma**2), default, rtol=1e-5, atol=1e-6
    )


def test_item_views_coalesce_without_copies():
    base = torch.randn(2, 3, 4, 5, 6)
    permuted = base.permute(0, 1, 3, 2, 4)  # items are 2 strided runs: no copy needed
    p, t = item_views(permuted, base.permute(0, 1, 3, 2, 4))
    assert p.shape == (2, 3, 5, 4, 6) and p.data_ptr() == base.data_ptr()
    contiguous = torch.randn(2, 3, 4, 5, 6)
    p, t = item_views(contiguous, contiguous)
    assert p.shape == (2, 3, 1, 1, 120) and p.stride()[2:] == (0, 0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_twice_eager_error(backend, device):
    dtypes = (torch.float16,) if backend == "triton" and device.type == "cpu" else None
    for dtype in dtypes or (torch.float16, torch.bfloat16):
        pred = torch.randn(2, 3, 40, 50, device=device).to(dtype).requires_grad_()
        target = torch.randn(2, 3, 40, 50, device=device).to(dtype)
        weight = torch.rand(3, device=device)
        energy = kvpo_kernels.tve_energy(pred, target, weight, backend=backend)
        oracle = _oracle(pred.detach(), target, weight)
        eager_pred = pred.detach().clone().requires_grad_()
        eager = _eager(eager_pred, target, weight)
        assert_close_to_oracle(
            energy.detach().cpu(), eager.detach().cpu(), oracle, what=f"{dtype} energy"
        )
        assert max_abs_err(energy.detach().cpu(), oracle) <= 1e-5 * float(oracle.abs().max())

        upstream = torch.randn(2, device=device)
        (grad,) = torch.autograd.grad(energy, pred, upstream)
        (eager_grad,) = torch.autograd.grad(eager, eager_pred, upstream.to(dtype))
        p64 = pred.detach().double().requires_grad_()
        (oracle_grad,) = torch.autograd.grad(
            _oracle(p64, target, weight), p64, upstream.double().cpu()
        )
        assert grad.dtype == dtype
        assert_close_to_oracle(grad.cpu(), eager_grad.cpu(), oracle_grad, what=f"{dtype} grad")
