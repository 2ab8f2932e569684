"""Backend registry: which implementation of an op serves a call.

Every op has implementations in some of the backends ``torch`` (eager reference, always
available), ``triton`` (GPU; on CPU only under ``TRITON_INTERPRET=1``) and ``cpp`` (the compiled
extension, CPU and CUDA). A call picks one by, in order: the ``backend=`` keyword, the environment
variable ``KVPO_KERNELS_BACKEND``, then ``auto``: the first usable backend in the op's preference
order for the tensors' device. An explicit choice that cannot serve the call raises
:class:`BackendUnavailable` naming what is missing; ``auto`` falls back silently and
:func:`explain` says what it chose and why (also logged at DEBUG level on ``kvpo_kernels``).

``import kvpo_kernels`` needs torch only. Triton is imported when the triton backend is first
considered (an explicit request, ``auto`` on CUDA, :func:`kvpo_kernels.info`), and an op's Triton
kernels (``kvpo_kernels.ops.triton.<op>``) on the first call that runs them; where Triton cannot
be imported, the backend is unusable and the reason says why.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch

from kvpo_kernels import extension

BACKENDS = ("torch", "triton", "cpp")
ENV_VAR = "KVPO_KERNELS_BACKEND"
DEFAULT_ORDER = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

log = logging.getLogger("kvpo_kernels")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a call."""


@dataclass
class Op:
    """One op: its implementations per backend and its ``auto`` preference per device type."""

    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    order: dict[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_ORDER))


_OPS: dict[str, Op] = {}


def op(name: str, order: dict[str, Sequence[str]] | None = None) -> Op:
    """The op called ``name``, created on first use (``order`` overrides the auto preference)."""
    entry = _OPS.setdefault(name, Op(name))
    if order is not None:
        entry.order.update(order)
    return entry


def register(name: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements op ``name`` in ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        op(name).impls[backend] = fn
        return fn

    return wrap


def ops() -> dict[str, Op]:
    return dict(_OPS)


@functools.cache
def _import_triton() -> tuple[ModuleType | None, str | None]:
    """``(triton, None)``, or ``(None, why not)``: the one place that imports Triton, on demand."""
    try:
        return importlib.import_module("triton"), None
    except ImportError as err:
        return None, f"triton is not importable ({err})"
    except Exception as err:  # a broken install fails in many ways; report it, do not crash
        return None, f"triton is not importable ({type(err).__name__}: {err})"


def triton_module() -> ModuleType | None:
    """The imported ``triton`` package, or None (then :func:`triton_error` says why)."""
    return _import_triton()[0]


def triton_error() -> str | None:
    """Why Triton cannot be imported, or None when it can."""
    return _import_triton()[1]


def lazy(module: str, attr: str) -> Callable:
    """``module.attr``, imported on the first call (how Triton kernels stay out of the import of
    kvpo_kernels: their modules import ``triton`` at the top)."""

    @functools.cache
    def load() -> Callable:
        return getattr(importlib.import_module(module), attr)

    def call(*args, **kwargs):
        return load()(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"lazy({module}.{attr})"
    return call


def _triton_reason(device_type: str) -> str | None:
    error = triton_error()
    if error is not None:
        return error
    if device_type == "cuda":
        return None
    if TRITON_INTERPRET:
        return None
    return (
        f"triton kernels need a CUDA device, got {device_type} tensors; on CPU they run only "
        "under TRITON_INTERPRET=1 set before kvpo_kernels is imported"
    )


def _cpp_reason(device_type: str) -> str | None:
    reason = extension.load_error()
    if reason is not None:
        return reason
    if device_type == "cuda" and not extension.cuda_built():
        return (
            "kvpo_kernels._C was built without CUDA kernels (torch was a CPU build or no CUDA "
            "toolkit was found at build time); rebuild with a CUDA torch and nvcc"
        )
    if device_type not in ("cpu", "cuda"):
        return f"kvpo_kernels._C has kernels for cpu and cuda, not {device_type}"
    return None


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` tensors, or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "cpp":
        return _cpp_reason(device_type)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _requested(backend: str | None) -> str | None:
    choice = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if choice is not None and choice != "auto" and choice not in BACKENDS:
        source = "backend=" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {choice!r}")
    return None if choice == "auto" else choice


def _choose(name: str, device: torch.device, backend: str | None) -> tuple[str, str]:
    entry = _OPS.get(name)
    if entry is None:
        raise KeyError(f"no op named {name!r}; known ops: {sorted(_OPS)}")
    requested = _requested(backend)
    if requested is not None:
        if requested not in entry.impls:
            raise BackendUnavailable(
                f"{name}: backend {requested!r} has no implementation of this op "
                f"(implemented: {sorted(entry.impls)})"
            )
        reason = unavailable_reason(requested, device.type)
        if reason is not None:
            raise BackendUnavailable(f"{name}: backend {requested!r} requested but {reason}")
        return requested, f"{requested} (requested)"
    skipped = []
    for candidate in entry.order.get(device.type, ("torch",)):
        if candidate not in entry.impls:
            skipped.append(f"{candidate}: not implemented for this op")
            continue
        reason = unavailable_reason(candidate, device.type)
        if reason is None:
            why = f"{candidate} (auto on {device.type}"
            return candidate, why + (f"; skipped {'; '.join(skipped)})" if skipped else ")")
        skipped.append(f"{candidate}: {reason}")
    raise BackendUnavailable(f"{name}: no backend can run on {device.type}: {'; '.join(skipped)}")


@torch.compiler.assume_constant_result
def _resolve_constant(name: str, device_type: str, backend: str | None) -> str:
    chosen, why = _choose(name, torch.device(device_type), backend)
    log.debug("%s -> %s", name, why)
    return chosen


def resolve(name: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that serves op ``name`` for tensors on ``device``.

    Under ``torch.compile`` the choice is made once at trace time and baked into the graph.
    """
    return _resolve_constant(name, device.type, backend)


def implementation(name: str, device: torch.device, backend: str | None = None) -> Callable:
    """The callable of the backend that :func:`resolve` picks."""
    return _OPS[name].impls[resolve(name, device, backend)]


def explain(name: str, *args, backend: str | None = None) -> str:
    """Which backend a call of op ``name`` with these arguments would use, and why."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    return f"{name}: {_choose(name, device, backend)[1]}"
