"""The one way an op of kvpo_kernels becomes a ``torch.library`` custom op.

Every op is a custom op that takes the name of the backend that serves the call (chosen by
:func:`kvpo_kernels.registry.resolve` before the call, so that ``torch.compile`` bakes the choice
into the graph) and runs that backend's implementation from the registry. :func:`backend_op`
defines such an op from a prototype (its typed signature is the schema) and registers its fake
implementation and, where given, its autograd formula.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch

from kvpo_kernels import registry


def _contiguous(result):
    """Tensor results made contiguous (the fake implementations promise contiguous outputs)."""
    if isinstance(result, torch.Tensor):
        return result.contiguous()
    if isinstance(result, (tuple, list)):
        return type(result)(_contiguous(r) for r in result)
    return result


def no_output(*args) -> None:
    """Fake implementation of an op that only mutates its inputs."""
    return None


def backend_op(
    qualname: str,
    op_name: str,
    *,
    fake: Callable,
    mutates_args: Iterable[str] = (),
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator: the custom op ``qualname`` running registry op ``op_name`` on a chosen backend.

    The decorated function is a prototype, never run: its annotated parameters, the last one
    ``backend: str``, give the op's schema, its docstring documents it. A call
    ``op(*inputs, backend)`` runs ``registry.op(op_name).impls[backend](*inputs)`` and returns its
    tensors contiguous. ``fake`` computes output metadata for tracing; ``backward`` and
    ``setup_context`` (both or neither) are the autograd formula of
    ``torch.library.register_autograd``.
    """
    if (backward is None) != (setup_context is None):
        raise ValueError(f"{qualname}: pass both backward and setup_context, or neither")

    def wrap(prototype: Callable) -> torch.library.CustomOpDef:
        signature = inspect.signature(prototype, eval_str=True)
        last = list(signature.parameters.values())[-1:]
        if not last or last[0].name != "backend" or last[0].annotation is not str:
            raise TypeError(f"{qualname}: the prototype's last parameter must be `backend: str`")
        impls = registry.op(op_name).impls

        def run(*args, **kwargs):
            *inputs, backend = signature.bind(*args, **kwargs).arguments.values()
            return _contiguous(impls[backend](*inputs))

        run.__signature__ = signature
        run.__name__, run.__qualname__ = prototype.__name__, prototype.__qualname__
        run.__doc__, run.__module__ = prototype.__doc__, prototype.__module__
        op = torch.library.custom_op(qualname, run, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        return op

    return wrap


def triton_kernel(module: str, attr: str) -> Callable:
    """``kvpo_kernels.ops.triton.<module>.<attr>``, imported on its first call (Triton is never
    imported by ``import kvpo_kernels``)."""
    return registry.lazy(f"kvpo_kernels.ops.triton.{module}", attr)
