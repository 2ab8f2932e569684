"""tve_energy: fused energies against the eager expression and its torch.compile, fwd and fwd+bwd.

Sizes from a toy item to a Wan latent block per item (3 x 16 x 60 x 104, K = 8 (block, step)
items, G = 8 branches). Providers: ``eager`` (the baseline: ``(w * ((p - t)**2).mean(S)).sum(1)``),
``torch.compile`` of that same expression (inductor), and ours (``cpp``; on CUDA also ``triton``).
Forward+backward differentiates w.r.t. ``pred`` with ``torch.autograd.grad``. Notes give the
effective bandwidth (inputs read, gradient written) and the peak memory in units of one input.
On CPU the half-size case (2 x 9.4 MiB of bf16 inputs) fits in the last-level cache, and the
toy case measures call overhead (torch.compile's there: waking its OpenMP team on a busy machine).
fwd+bwd includes first-touch page faults of the fresh gradient, for every provider.
``KVPO_BENCH_QUICK=1`` (the time-boxed GPU script) keeps the bf16 Wan block case alone.
"""

import os

import pytest
import torch

from kvpo_kernels import tve_energy
from kvpo_kernels.registry import unavailable_reason

SUITE = "tve_energy"
CASES = [  # (name, item shape S, K, dtype)
    ("toy", (4, 8, 8), 4, torch.bfloat16),
    ("half Wan block", (3, 16, 30, 52), 8, torch.bfloat16),
    ("Wan block", (3, 16, 60, 104), 8, torch.bfloat16),
    ("Wan block", (3, 16, 60, 104), 8, torch.float32),
]
if os.environ.get("KVPO_BENCH_QUICK") == "1":
    CASES = [c for c in CASES if c[0] == "Wan block" and c[3] == torch.bfloat16]
GROUPS = 8


def eager_energy(pred, target, weight):
    return (weight * ((pred - target) ** 2).flatten(2).mean(-1)).sum(1)


def _providers(device):
    compiled = torch.compile(eager_energy, dynamic=False)
    yield "eager", eager_energy, True
    yield "torch.compile", compiled, False
    for backend in ("cpp", "triton"):
        if unavailable_reason(backend, device.type) is None and not (
            backend == "triton" and device.type == "cpu"  # the interpreter's timings mean nothing
        ):
            yield backend, lambda p, t, w, b=backend: tve_energy(p, t, w, backend=b), False


@pytest.mark.parametrize("name,item_shape,items,dtype", CASES)
def test_tve_energy(recorder, device, name, item_shape, items, dtype):
    torch._dynamo.config.cache_size_limit = 64  # one static graph per case and mode
    # compile in-process: inductor's worker pool would otherwise start up in the background and
    # take the CPU from the first timed calls
    torch._inductor.config.compile_threads = 1
    pred = torch.randn(GROUPS, items, *item_shape, device=device).to(dtype)
    target = torch.randn(GROUPS, items, *item_shape, device=device).to(dtype)
    weight = torch.rand(items, device=device)
    upstream = torch.randn(GROUPS, device=device)
    leaf = pred.detach().requires_grad_()
    input_bytes = pred.numel() * pred.element_size()
    size = "x".join(map(str, item_shape))
    dtype_name = str(dtype).removeprefix("torch.")
    reference = eager_energy(pred.float(), target.float(), weight)
    for mode, moved in (("fwd", 2 * input_bytes), ("fwd+bwd", 5 * input_bytes)):
        case = f"{name} G={GROUPS} K={items} S={size} {dtype_name} {mode}"
        for provider, fn, baseline in _providers(device):
            if mode == "fwd":

                def call(fn=fn):
                    with torch.no_grad():
                        return fn(pred, target, weight)
            else:

                def call(fn=fn):
                    return torch.autograd.grad(fn(leaf, target, weight), leaf, upstream)

            with torch.no_grad():
                energy = fn(pred, target, weight).float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # eager rounds in bf16
            torch.testing.assert_close(energy, reference, rtol=tol, atol=tol)
            row = recorder.measure(SUITE, case, provider, call, device, baseline=baseline)
            row.extra["GB/s"] = round(moved / row.median_ms / 1e6, 1)
            if row.peak_bytes is not None:
                row.extra["peak/input"] = round(row.peak_bytes / input_bytes, 2)


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
