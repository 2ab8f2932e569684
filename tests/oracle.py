"""Helpers for comparing kernels with an fp64 oracle.

The low-precision rule: a kernel's error against the fp64 reference may be at most
``factor`` (2) times the error of eager PyTorch computing the same thing in the same dtype,
plus a small absolute floor for outputs that are exact in both.
"""

from __future__ import annotations

import torch

# Tolerances for results that must match a float reference up to rounding order.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# Smallest error budget for the 2x rule (for outputs eager computes exactly).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

BACKENDS = ("torch", "triton", "cpp")


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, with matching infinities counted as 0, NaNs as inf."""
    x64, r64 = x.double(), ref.double()
    same_inf = torch.isinf(x64) & torch.isinf(r64) & (torch.sign(x64) == torch.sign(r64))
    diff = (x64 - r64).abs().masked_fill(same_inf, 0.0)
    diff = diff.masked_fill(torch.isnan(diff), float("inf"))
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_to_oracle(
    out: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, factor: float = 2.0, what=""
):
    """``out``'s error against ``oracle`` is at most ``factor`` x eager's error (+ floor)."""
    kernel_err = max_abs_err(out, oracle)
    eager_err = max_abs_err(eager, oracle)
    budget = factor * eager_err + FLOOR[out.dtype] * max(1.0, float(oracle.double().abs().max()))
    assert kernel_err <= budget, (
        f"{what} error {kernel_err:.3e} exceeds {factor}x eager's {eager_err:.3e} "
        f"(budget {budget:.3e}, dtype {out.dtype})"
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str = ""):
    tol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out, ref.to(out.dtype), **tol, msg=lambda m: f"{what}: {m}")
