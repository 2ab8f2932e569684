"""tve_energy and tve_energy_x0 on every backend against an fp64 oracle (a loop over items)."""

import pytest
import torch

import kvpo_kernels
from kvpo_kernels.ops.tve import item_views
from tests.oracle import TOLERANCES, assert_close_to_oracle, max_abs_err

BACKENDS = ("torch", "triton", "cpp")


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
                value = value * w.double().cpu()
            out[g] += value
    return out


def _eager(pred, target, weight=None):
    """The expression a user would write, in the inputs' dtype."""
    per_item = ((pred - target) ** 2).flatten(2).mean(-1)
    return (per_item * weight.to(pred.dtype)).sum(1) if weight is not None else per_item.sum(1)


def _interpreted_triton(backend, device):
    return backend == "triton" and device.type == "cpu"


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


@pytest.mark.parametrize("backend", ("torch", "cpp"))
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
    assert (
        p.shape == (2, 3, 1, 1, 120)
        and p.stride()[-1] == 1
        and p.data_ptr() == contiguous.data_ptr()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_twice_eager_error(backend, device):
    for dtype in (torch.float16, torch.bfloat16):
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout", ["permuted", "stepped", "expanded_target", "strided_items", "four_strided_dims"]
)
def test_non_contiguous_inputs(backend, layout, device):
    base = torch.randn(2, 6, 4, 6, 10, device=device)
    other = torch.randn(2, 6, 4, 6, 10, device=device)
    if layout == "permuted":
        target = torch.randn(2, 6, 6, 4, 10, device=device).permute(0, 1, 4, 3, 2)
        pred = base.permute(0, 1, 4, 2, 3)
    elif layout == "stepped":
        pred, target = base[..., ::2], other[..., 1::2]
    elif layout == "expanded_target":
        pred, target = base, other[:1, :1, :1].expand_as(base)
    elif layout == "strided_items":
        pred, target = base[:, ::2], other[:, 1::2]
    else:  # four dims that no coalescing merges: copied to contiguous first
        pred = torch.randn(2, 3, 4, 5, 6, 7, device=device).permute(0, 1, 5, 3, 4, 2)[..., ::2]
        target = torch.randn(2, 3, 7, 5, 6, 2, device=device)
    pred = pred.requires_grad_() if pred.is_leaf else pred.detach().requires_grad_()
    weight = torch.rand(pred.shape[0], pred.shape[1], device=device)
    energy = kvpo_kernels.tve_energy(pred, target, weight, backend=backend)
    expected = _oracle(pred.detach(), target, weight)
    torch.testing.assert_close(energy.double().cpu(), expected, **TOLERANCES[torch.float32])
    (grad,) = torch.autograd.grad(energy.sum(), pred)
    p64 = pred.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(_oracle(p64, target, weight).sum(), p64)
    torch.testing.assert_close(grad.double().cpu(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ("torch", "cpp"))
def test_large_items_two_stage_reduction(backend, device):
    # 3M elements per item: ~92 chunks per item in the cpp kernel, fp32 all along
    pred = torch.randn(1, 2, 3_000_000, device=device)
    target = torch.randn(1, 2, 3_000_000, device=device) * 0.5 + 0.1
    weight = torch.tensor([0.25, 1.5], device=device)
    energy = kvpo_kernels.tve_energy(pred, target, weight, reduction="sum", backend=backend)
    diff = pred.double() - target.double()
    expected = (weight.double() * (diff * diff).sum(-1)).sum(1)
    torch.testing.assert_close(energy.double(), expected, rtol=2e-6, atol=0)


def test_cpp_is_deterministic_across_thread_counts():
    pred = torch.randn(3, 2, 700_001).requires_grad_()
    target = torch.randn(3, 2, 700_001)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            energy = kvpo_kernels.tve_energy(pred, target, backend="cpp")
            (grad,) = torch.autograd.grad(energy.sum(), pred)
            results.append((energy, grad))
    finally:
        torch.set_num_threads(threads)
    for energy, grad in results[1:]:
        assert torch.equal(energy, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_branch_single_item_and_empty(backend, device):
    pred = torch.randn(1, 1, 7, device=device, requires_grad=True)
    target = torch.randn(1, 1, 7, device=device)
    energy = kvpo_kernels.tve_energy(pred, target, backend=backend)
    torch.testing.assert_close(energy.double().cpu(), _oracle(pred.detach(), target))
    scalar_items = torch.randn(3, 4, device=device)  # S = (): each item is one element
    energy = kvpo_kernels.tve_energy(scalar_items, torch.zeros_like(scalar_items), backend=backend)
    torch.testing.assert_close(energy, (scalar_items**2).sum(1))
    none = torch.zeros(2, 0, 5, device=device)
    assert torch.equal(kvpo_kernels.tve_energy(none, none, backend=backend), torch.zeros(2))
    empty_items = torch.zeros(2, 3, 0, device=device)
    energy = kvpo_kernels.tve_energy(empty_items, empty_items, reduction="sum", backend=backend)
    assert torch.equal(energy, torch.zeros(2, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_items_without_grad_equal_one_call(backend, device):
    """The documented pattern: items with grad in one call, the replayed rest in another."""
    groups, items, grad_items = 2, 4, 2
    pred = torch.randn(groups, items, 5, 6, device=device)
    target = torch.randn(groups, items, 5, 6, device=device)
    weight = torch.rand(items, device=device)
    with_grad = pred[:, :grad_items].clone().requires_grad_()
    split = kvpo_kernels.tve_energy(
        with_grad, target[:, :grad_items], weight[:grad_items], backend=backend
    ) + kvpo_kernels.tve_energy(
        pred[:, grad_items:], target[:, grad_items:], weight[grad_items:], backend=backend
    )
    whole = pred.clone().requires_grad_()
    joint = kvpo_kernels.tve_energy(whole, target, weight, backend=backend)
    torch.testing.assert_close(split, joint)
    (grad,) = torch.autograd.grad(split.sum(), with_grad)
    (joint_grad,) = torch.autograd.grad(joint.sum(), whole)
    torch.testing.assert_close(grad, joint_grad[:, :grad_items])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_for_target_and_weight(backend, device):
    pred = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    target = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    weight = torch.rand(3, device=device, requires_grad=True)
    upstream = torch.randn(2, device=device)
    grads = torch.autograd.grad(
        kvpo_kernels.tve_energy(pred, target, weight, backend=backend), (pred, target, weight),
        upstream,
    )  # fmt: skip
    leaves = [x.detach().double().cpu().requires_grad_() for x in (pred, target, weight)]
    expected = torch.autograd.grad(_oracle(*leaves), leaves, upstream.double().cpu())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[torch.float32])
    # target alone requires grad: its gradient is the negation of pred's
    (grad_target,) = torch.autograd.grad(
        kvpo_kernels.tve_energy(pred.detach(), target, backend=backend).sum(), target
    )
    (grad_pred,) = torch.autograd.grad(
        kvpo_kernels.tve_energy(pred, target.detach(), backend=backend).sum(), pred
    )
    assert torch.equal(grad_target, -grad_pred)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf/NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_conversions_exhaustive(backend, device):
    """Every fp16 bit pattern decodes exactly (forward) and re-encodes to its bits (backward)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16).to(device)
    # forward: each value its own item against a zero target, (x - 0)^2 is exact in fp32
    items = values[::1999] if _interpreted_triton(backend, device) else values  # interpreter: slow
    items = items.view(-1, 1, 1)
    energy = kvpo_kernels.tve_energy(items, torch.zeros_like(items), backend=backend).cpu()
    x = items.view(-1).double().cpu()
    finite = torch.isfinite(x)
    assert torch.equal(energy[finite].double(), x[finite] ** 2)
    assert torch.isposinf(energy[torch.isinf(x)]).all()
    assert torch.isnan(energy[torch.isnan(x)]).all()
    # backward with coef 0.5: grad = round((x - 0) * 1) must give x back, bit for bit
    one_item = values.view(1, 1, -1)
    (grad,) = torch.ops.kvpo.tve_item_sq_sum_backward(
        torch.full((1, 1), 0.5, device=device), one_item, torch.zeros_like(one_item), False, backend
    )
    numbers = ~torch.isnan(values)
    assert torch.equal(grad.view(-1)[numbers].view(torch.int16).cpu(), bits[numbers.cpu()])
    assert torch.isnan(grad.view(-1)[~numbers]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on overflow
@pytest.mark.parametrize("backend", ("cpp", "triton"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_backward_rounding_matches_torch_bitwise(backend, dtype, device):
    """Gradients over the whole exponent range (subnormal to overflow) round like torch's cast."""
    if dtype == torch.bfloat16 and _interpreted_triton(backend, device):
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 instead of rounding")
    pred = torch.randn(2, 16, 50, device=device).to(dtype)
    target = torch.randn(2, 16, 50, device=device).to(dtype)
    low, high = (-40, 20) if dtype == torch.float16 else (-150, 127)
    coef = torch.exp2(torch.linspace(low, high, 32, device=device)).view(2, 16)
    coef = torch.where(torch.rand(2, 16, device=device) < 0.5, -coef, coef)
    grads = {
        b: torch.ops.kvpo.tve_item_sq_sum_backward(coef, pred, target, True, b)
        for b in ("torch", backend)
    }
    reference = grads["torch"][0]
    subnormal = (reference != 0) & (reference.abs() < torch.finfo(dtype).tiny)
    assert torch.isinf(reference).any() and subnormal.any()
    for want, got in zip(grads["torch"], grads[backend]):
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("backend", ("torch", "cpp"))
def test_opcheck_and_compile(backend):
    from kvpo_kernels.ops.tve import _item_sq_sum_backward_op, _item_sq_sum_op

    pred = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randn(2, 3, 4, 5)
    torch.library.opcheck(_item_sq_sum_op, (pred, target, backend))
    coef = torch.randn(2, 3)
    torch.library.opcheck(_item_sq_sum_backward_op, (coef, pred.detach(), target, True, backend))

    weight = torch.rand(3)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss(p):
        return kvpo_kernels.tve_energy(p, target, weight, backend=backend).square().sum()

    (grad,) = torch.autograd.grad(loss(pred), pred)
    p64 = pred.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(_oracle(p64, target, weight).square().sum(), p64)
    torch.testing.assert_close(grad.double(), expected)


def test_auto_backend_on_cpu_is_cpp():
    pred = torch.randn(1, 1, 4)
    assert kvpo_kernels.explain("tve_energy", pred).startswith("tve_energy: cpp (auto on cpu")


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(target=torch.zeros(2, 3, 5)), ValueError, r"pred is \(2, 3, 4\), target \(2, 3, 5\)"),
        (dict(target=torch.zeros(2, 3, 4, dtype=torch.float16)), TypeError, "one dtype"),
        (dict(weight=torch.ones(2)), ValueError, r"weight must be \[K\] = \[3\] or \[G, K\]"),
        (dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(pred=torch.zeros(3, dtype=torch.int32)), TypeError, "fp32, fp16, bf16 or fp64"),
        (dict(pred=torch.zeros(3)), ValueError, r"must be \[G, K, \*S\]"),
    ],
)
def test_rejects_bad_arguments(kwargs, err, match):
    args = dict(pred=torch.zeros(2, 3, 4), target=torch.zeros(2, 3, 4), weight=None)
    args.update(kwargs)
    reduction = args.pop("reduction", "mean")
    with pytest.raises(err, match=match):
        kvpo_kernels.tve_energy(**args, reduction=reduction)


def test_x0_form_rejects_non_positive_sigma():
    x0 = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"sigma\[2\] is 0.0: the velocity form needs sigma > 0"):
        kvpo_kernels.tve_energy_x0(x0, x0, [1.0, 0.5, 0.0])
