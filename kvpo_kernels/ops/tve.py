"""Trajectory Velocity Energy (TVE): fused, deterministic per-branch squared-error energies.

``tve_energy(pred, target, weight)``: ``E[g] = sum_k weight[.., k] * reduce_S((pred[g, k] -
target[g, k])^2)`` with ``reduce`` the mean or the sum over the trailing dims ``S``.
``tve_energy_x0`` is the same energy computed from x0 predictions and per-step ``sigma``.

The large reduction is one op, ``kvpo::tve_item_sq_sum`` (``[G, K, *S] -> [G, K]`` sums of
squared differences), on every backend: torch (here), triton (:mod:`kvpo_kernels.ops.triton.tve`),
cpp CPU/CUDA (``csrc/cpu/tve.cpp``, ``csrc/cuda/tve.cu``); the ``[G, K]`` weighting
and the sum over ``K`` are ordinary (tiny) torch ops, so the weight and ``sigma`` get gradients
from autograd for free. Kernels accumulate in fp32 (fp64 for fp64 inputs) with a fixed two-stage
reduction: fixed-size chunks of each item are summed into a partials buffer, then each item's
partials are summed in chunk order. No float atomics: results do not depend on the thread count
or on scheduling.

Items that carry no gradient (the method replays the first denoising steps with grad and the rest
without) are passed as a second call: ``tve_energy(p_grad, t[:, :n], w[:n]) + tve_energy(p_rest,
t[:, n:], w[n:])`` equals one call on the concatenation (every item is reduced on its own), and the
second call records no autograd graph because none of its inputs requires grad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvpo_kernels import extension, registry
from kvpo_kernels.checks import check_same_device
from kvpo_kernels.ops._registration import backend_op, triton_kernel

OP = "tve_energy"
BACKWARD_OP = "tve_energy_backward"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum")
MAX_ITEM_DIMS = 3  # the kernels walk an item as up to 3 strided dims after coalescing


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for fp32/fp16/bf16 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- layout: [G, K, *S] -> [G, K, A, B, C] views the kernels walk ---------------------------


def _coalesce(sizes: Sequence[int], strides: Sequence[Sequence[int]]):
    """Merge neighbouring dims that are contiguous with each other in every tensor."""
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(sizes) if n != 1]
    merged: list[tuple[int, list[int]]] = []
    for n, st in dims:
        if merged:
            outer_n, outer_st = merged[-1]
            if all(o == s * n for o, s in zip(outer_st, st)):
                merged[-1] = (outer_n * n, st)
                continue
        merged.append((n, st))
    return merged


def item_views(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, K, *S]`` tensors as ``[G, K, A, B, C]`` strided views with the same element order.

    Trailing dims are coalesced where both tensors allow it; a tensor whose items still need more
    than three strided dims is copied to contiguous memory (then one dim suffices). The element
    order of an item is row-major over ``S`` in both, so a contiguous ``[G, K, *S]`` gradient and
    the views index the same element by the same linear position.
    """
    if pred.is_contiguous() and target.is_contiguous():
        shape = (*pred.shape[:2], 1, 1, math.prod(pred.shape[2:]))
        return pred.view(shape), target.view(shape)
    sizes = pred.shape[2:]
    operands = [pred, target]
    merged = _coalesce(sizes, [t.stride()[2:] for t in operands])
    if len(merged) > MAX_ITEM_DIMS:
        operands = [t if t.is_contiguous() else t.contiguous() for t in operands]
        merged = _coalesce(sizes, [t.stride()[2:] for t in operands])
    merged = [(1, [0, 0])] * (MAX_ITEM_DIMS - len(merged)) + merged
    shape = tuple(pred.shape[:2]) + tuple(n for n, _ in merged)
    views = []
    for j, t in enumerate(operands):
        strides = tuple(t.stride()[:2]) + tuple(st[j] for _, st in merged)
        views.append(t.as_strided(shape, strides))
    return views[0], views[1]


# --- torch backend (the reference) ----------------------------------------------------------


def _twice_per_element(c: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return (2 * c).reshape(c.shape + (1,) * (pred.dim() - 2))


@registry.register(OP, "torch")
def _item_sq_sum_torch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(pred.dtype)
    diff = pred.to(acc) - target.to(acc)
    return (diff * diff).flatten(2).sum(-1) if pred.dim() > 2 else diff * diff


@registry.register(BACKWARD_OP, "torch")
def _item_sq_sum_backward_torch(
    coef: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, with_target: bool
) -> list[torch.Tensor]:
    acc = coef.dtype
    diff = pred.to(acc) - target.to(acc)
    grad = (diff * _twice_per_element(coef, pred)).to(pred.dtype).contiguous()
    return [grad, -grad] if with_target else [grad]


# --- kernel backends (triton, cpp): they take [G, K, A, B, C] item views ---------------------


def _register_kernels(backend: str, forward, backward) -> None:
    """``forward(p, t) -> [G, K]``, ``backward(coef, p, t, with_target) -> [[G, K, N], ...]``."""

    def item_sq_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.numel() == 0:
            return pred.new_zeros(pred.shape[:2], dtype=accumulation_dtype(pred.dtype))
        return forward(*item_views(pred, target))

    def item_sq_sum_backward(coef, pred, target, with_target):
        if pred.numel() == 0:
            grad = torch.zeros(pred.shape, dtype=pred.dtype, device=pred.device)
            return [grad, grad.clone()] if with_target else [grad]
        grads = backward(coef.contiguous(), *item_views(pred, target), with_target)
        return [g.view(pred.shape) for g in grads]

    registry.register(OP, backend)(item_sq_sum)
    registry.register(BACKWARD_OP, backend)(item_sq_sum_backward)


_register_kernels(
    "triton", triton_kernel("tve", "item_sq_sum"), triton_kernel("tve", "item_sq_sum_backward")
)
_register_kernels(
    "cpp",
    lambda *args: extension.ops().tve_item_sq_sum(*args),
    lambda *args: extension.ops().tve_item_sq_sum_backward(*args),
)


# --- custom ops: schema, fake tensors, autograd ---------------------------------------------


def _item_sq_sum_fake(pred, target, backend):
    return pred.new_empty(pred.shape[:2], dtype=accumulation_dtype(pred.dtype))


def _item_sq_sum_backward_fake(coef, pred, target, with_target, backend):
    count = 2 if with_target else 1
    return [torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) for _ in range(count)]


@backend_op("kvpo::tve_item_sq_sum_backward", BACKWARD_OP, fake=_item_sq_sum_backward_fake)
def _item_sq_sum_backward_op(
    coef: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, with_target: bool, backend: str
) -> list[torch.Tensor]:
    """``coef [G, K]`` -> ``[2 coef (pred - target)]`` (+ its negation for ``target``).

    Gradients are contiguous ``[G, K, *S]`` tensors in the input dtype, computed in ``coef``'s
    dtype and rounded once.
    """


def _setup_context(ctx, inputs, output):
    pred, target, backend = inputs
    ctx.save_for_backward(pred, target)
    ctx.backend = backend


def _backward(ctx, grad_items):
    pred, target = ctx.saved_tensors
    need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_pred or need_target):
        return None, None, None
    grads = _item_sq_sum_backward_op(grad_items, pred, target, need_target, ctx.backend)
    grad_pred = grads[0] if need_pred else None
    grad_target = grads[1] if need_target else None
    return grad_pred, grad_target, None


@backend_op(
    "kvpo::tve_item_sq_sum",
    OP,
    fake=_item_sq_sum_fake,
    backward=_backward,
    setup_context=_setup_context,
)
def _item_sq_sum_op(pred: torch.Tensor, target: torch.Tensor, backend: str) -> torch.Tensor:
    """``[G, K, *S]`` x2 -> ``[G, K]`` sums over ``S`` of ``(pred - target)^2`` (fp32|fp64)."""


# --- public API -----------------------------------------------------------------------------


def _check_inputs(pred: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be fp32, fp16, bf16 or fp64, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must be [G, K, *S], got shape {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred is {tuple(pred.shape)}, target {tuple(target.shape)}: must match")
    if pred.dtype != target.dtype:
        raise TypeError(f"pred is {pred.dtype}, target {target.dtype}: pass both in one dtype")
    check_same_device("target", target, pred.device)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "mean" and 0 in pred.shape[2:]:
        raise ValueError(f"reduction='mean' over an empty item: shape {tuple(pred.shape)}")


def _check_per_item(t: torch.Tensor, name: str, pred: torch.Tensor) -> None:
    groups, items = pred.shape[:2]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32), got {t.dtype}")
    if tuple(t.shape) not in ((items,), (groups, items)):
        raise ValueError(
            f"{name} must be [K] = [{items}] or [G, K] = [{groups}, {items}], got {tuple(t.shape)}"
        )
    check_same_device(name, t, pred.device)


def _weighted_sum(items: torch.Tensor, weight: torch.Tensor | None, count: int, reduction: str):
    per_item = items / count if reduction == "mean" else items
    if weight is None:
        return per_item.sum(1)
    return (per_item * weight.to(items.dtype)).sum(1)


def tve_energy(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Per-branch weighted squared-error energies, fused and deterministic.

    ``E[g] = sum_k weight[.., k] * reduce_S((pred[g, k] - target[g, k])^2)``.

    Args:
        pred: ``[G, K, *S]`` (fp32|fp16|bf16, or fp64 for checks), any strides: the current
            policy's velocities for ``G`` branches and ``K`` (block, step) items.
        target: same shape and dtype as ``pred``: the velocities the branches followed.
        weight: ``[K]`` (shared by the branches) or ``[G, K]`` fp32 per-item weights, or None
            (all ones). May require grad.
        reduction: ``"mean"`` or ``"sum"`` over ``S``.
        backend: ``"torch" | "triton" | "cpp" | "auto"`` (default: $KVPO_KERNELS_BACKEND or auto).

    Returns:
        ``E``: ``[G]`` fp32 (fp64 for fp64 inputs).

    Gradients flow to ``pred``, to ``target`` when it requires grad (the negation, from the same
    kernel pass) and to ``weight``; the input gradients are contiguous, in the input dtype.
    For items without gradient, see the module docstring (two calls).
    """
    _check_inputs(pred, target, reduction)
    if weight is not None:
        _check_per_item(weight, "weight", pred)
    items = _item_sq_sum_op(pred, target, registry.resolve(OP, pred.device, backend))
    return _weighted_sum(items, weight, math.prod(pred.shape[2:]), reduction)


def _as_sigma(sigma, pred: torch.Tensor) -> torch.Tensor:
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.tensor(sigma, dtype=torch.float32, device=pred.device)
    _check_per_item(sigma, "sigma", pred)
    if sigma.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (sigma <= 0).nonzero()
        if bad.numel():
            where = tuple(bad[0].tolist())
            raise ValueError(
                f"sigma{list(where)} is {float(sigma[where])}: the velocity form needs sigma > 0"
            )
    return sigma


def tve_energy_x0(
    x0_pred: torch.Tensor,
    x0_target: torch.Tensor,
    sigma,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """TVE energies from x0 predictions: the velocity-form energy without materialising ``v``.

    With ``v = (z - x0) / sigma_k`` for the shared noisy input ``z``, ``v_pred - v_target =
    (x0_target - x0_pred) / sigma_k``, so ``tve_energy(v_pred, v_target, weight) ==
    tve_energy(x0_pred, x0_target, weight / sigma^2)``: this function computes the right-hand
    side.

    Args:
        x0_pred, x0_target: ``[G, K, *S]`` (fp32|fp16|bf16|fp64), any strides.
        sigma: ``[K]`` or ``[G, K]`` per-item noise levels (> 0; a tensor or a list of floats).
        weight: velocity-form weights ``w_k`` (``[K]`` or ``[G, K]``), or None for the method's
            default ``w_k = sigma_k^2``, which makes ``E[g]`` the plain sum over ``k`` of the x0
            errors (what the reference code computes).
        reduction, backend: as in :func:`tve_energy`.

    Returns:
        ``E``: ``[G]`` fp32 (fp64 for fp64 inputs).
    """
    _check_inputs(x0_pred, x0_target, reduction)
    sigma = _as_sigma(sigma, x0_pred)
    if weight is not None:
        _check_per_item(weight, "weight", x0_pred)
        acc = accumulation_dtype(x0_pred.dtype)
        weight = weight.to(acc) / sigma.to(acc).square()
    return tve_energy(x0_pred, x0_target, weight, reduction=reduction, backend=backend)
