"""``kvpo_kernels.info()``: version, built and usable backends, and why not where not."""

from __future__ import annotations

import torch

from kvpo_kernels import extension, registry
from kvpo_kernels._version import __version__


def _triton_version() -> str:
    module = registry.triton_module()
    return module.__version__ if module is not None else f"unavailable: {registry.triton_error()}"


def info() -> str:
    """A human-readable report of the installation (print it)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [
        f"kvpo_kernels {__version__}",
        f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {_triton_version()}, "
        f"TRITON_INTERPRET={'1' if registry.TRITON_INTERPRET else '0'}",
        "extension kvpo_kernels._C: "
        + (
            f"built{' with CUDA' if extension.cuda_built() else ' (CPU only)'}, "
            f"OpenMP threads {extension.module().openmp_threads()}"
            if extension.module() is not None
            else extension.load_error()
        ),
        "backends:",
    ]
    for backend in registry.BACKENDS:
        for device in devices:
            reason = registry.unavailable_reason(backend, device)
            state = "usable" if reason is None else f"unusable: {reason}"
            lines.append(f"  {backend:<7}{device:<5} {state}")
    lines.append("ops:")
    for name, entry in sorted(registry.ops().items()):
        lines.append(f"  {name}: {', '.join(b for b in registry.BACKENDS if b in entry.impls)}")
    return "\n".join(lines)
