"""Loading of the compiled extension ``kvpo_kernels._C`` and what it was built with."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def _load():
    try:
        module = importlib.import_module("kvpo_kernels._C")
    except ImportError as err:
        return None, (
            f"the compiled extension kvpo_kernels._C is not built ({err}); "
            "run `pip install --no-build-isolation -e .`"
        )
    return module, None


def module():
    """The loaded ``_C`` module (its ops are then in ``torch.ops.kvpo_C``), or None."""
    return _load()[0]


def load_error() -> str | None:
    """Why the extension cannot be used, or None when it loaded."""
    return _load()[1]


def cuda_built() -> bool:
    """True when the extension carries CUDA kernels."""
    mod = module()
    return bool(mod is not None and mod.cuda_built())


def ops():
    """``torch.ops.kvpo_C``, the extension's ops (registered when the extension loads)."""
    if module() is None:
        raise RuntimeError(load_error())
    return torch.ops.kvpo_C
