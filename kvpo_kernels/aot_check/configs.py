"""The kernel x launch configurations to compile: the real launchers
(:mod:`kvpo_kernels.ops.triton`) are called with ``meta`` tensors of representative shapes
(dtypes, head dims, MHA and GQA, TVE layouts, page rows) while their launches are recorded, and
each recorded launch becomes one :class:`Job` per autotune config, with Triton's own argument
specialisation."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch

from .limits import LIMITS

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32", "tf32", "fp64")
HEAD_DIMS = (64, 128)
GROUPS = (1, 4)  # query heads per K/V head: MHA (the Wan models) and GQA
KERNEL_MODULES = ("routed_attention", "tve", "write_pages", "copy_pages")

_TORCH_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "tf32": torch.float32,
    "fp64": torch.float64,
}


# --- launches: the real launchers called with meta tensors ----------------------------------


@dataclass
class Launch:
    """One kernel launch a launcher made: the JIT function, its arguments and, for an autotuned
    kernel, all configs and those the pruning kept."""

    fn: object
    args: tuple
    kwargs: dict
    configs: list | None = None
    pickable: list | None = None
    error: str | None = None


@contextlib.contextmanager
def _recording(arch: int) -> Iterator[list[Launch]]:
    """Kernel launches are recorded instead of run; pruning sees ``arch``'s shared memory."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from kvpo_kernels.ops.triton import routed_attention

    launches: list[Launch] = []

    def autotuner_run(self, *args, **kwargs):
        launch = Launch(self.fn, args, kwargs, configs=list(self.configs))
        self.nargs = dict(zip(self.arg_names, args))
        try:
            launch.pickable = list(self.prune_configs(kwargs))
        except Exception as e:  # reported as a failure of every config of the launch
            launch.pickable, launch.error = [], f"pruning failed: {e}"
        finally:
            self.nargs = None
        launches.append(launch)

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    limits = (arch, LIMITS[arch].shared_per_block)
    with (
        mock.patch.object(Autotuner, "run", autotuner_run),
        mock.patch.object(JITFunction, "run", jit_run),
        mock.patch.object(routed_attention, "_device_limits", lambda device: limits),
    ):
        yield launches


@contextlib.contextmanager
def _fp32_matmuls_in_tf32(enabled: bool) -> Iterator[None]:
    """PyTorch's switch for TF32 in fp32 CUDA matmuls, set for the duration (then restored)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9: the new API only
        name, value = "fp32_precision", "tf32" if enabled else "ieee"
    else:
        name, value = "allow_tf32", enabled
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention_launches(dtype_name: str, head_dim: int, group: int) -> None:
    """Forward and backward of routed attention, Wan-sized: 12 query heads, a page = one latent
    frame of 1560 tokens, a block of 3 frames attending 3 cached frames."""
    from kvpo_kernels.ops.triton import routed_attention as ra

    dtype = _TORCH_DTYPES[dtype_name]
    batch, heads, page_size, frames = 2, 12, 1560, 3
    lq = ln = frames * page_size
    kv_heads = heads // group
    q = _meta(batch, lq, heads, head_dim, dtype=dtype)
    k_new = _meta(batch, ln, kv_heads, head_dim, dtype=dtype)
    v_new = _meta(batch, ln, kv_heads, head_dim, dtype=dtype)
    pages = _meta(4 * frames, 2, page_size, kv_heads, head_dim, dtype=dtype)
    table = _meta(batch, frames, dtype=torch.int32)
    ctx_lens = _meta(batch, dtype=torch.int32)
    scale = head_dim**-0.5
    with _fp32_matmuls_in_tf32(dtype_name == "tf32"):
        out, lse = ra.forward(q, k_new, v_new, pages, table, ctx_lens, scale)
        ra.backward(
            torch.empty_like(out),
            torch.empty_like(lse),
            q,
            k_new,
            v_new,
            pages,
            table,
            ctx_lens,
            out,
            lse,
            scale,
        )


def _tve_launches(dtype_name: str, contiguous: bool) -> None:
    """TVE energy forward and backward (with and without the target's gradient) on Wan-sized
    latents ``[G=4, K=3, 16, 3, 60, 104]``, contiguous or a strided slice."""
    from kvpo_kernels.ops.triton import tve
    from kvpo_kernels.ops.tve import accumulation_dtype, item_views

    dtype = _TORCH_DTYPES[dtype_name]
    full = _meta(4, 3, 16, 3, 60, 104 if contiguous else 128, dtype=dtype)
    pred = full if contiguous else full[..., :104]
    p, t = item_views(pred, pred)
    tve.item_sq_sum(p, t)
    coef = _meta(4, 3, dtype=accumulation_dtype(dtype))
    for with_target in (False, True):
        tve.item_sq_sum_backward(coef, p, t, with_target)


def _write_pages_launch(dtype_name: str, kv_heads: int, head_dim: int) -> None:
    """``write_pages`` of a 3-frame block (1560 tokens a frame) into a pool."""
    from kvpo_kernels.ops.triton import write_pages

    dtype = _TORCH_DTYPES[dtype_name]
    page_size, tokens = 1560, 3 * 1560
    pool = _meta(16, 2, page_size, kv_heads, head_dim, dtype=dtype)
    k = _meta(tokens, kv_heads, head_dim, dtype=dtype)
    write_pages.write_pages(pool, k, k, _meta(tokens, dtype=torch.int64))


def _copy_pages_launch(dtype_name: str) -> None:
    """``copy_pages`` of 2 pages in a 30-layer pool."""
    from kvpo_kernels.ops.triton import copy_pages

    pool = _meta(30, 16, 2, 1560, 12, 128, dtype=_TORCH_DTYPES[dtype_name])
    ids = _meta(2, dtype=torch.int32)
    copy_pages.copy_pages(pool, ids, ids)


def scenarios(dtypes=DTYPES, head_dims=HEAD_DIMS, kernels=KERNEL_MODULES, groups=GROUPS):
    """``(module, description, call)`` for every launch situation checked."""
    out = []
    for dtype in dtypes:
        for head_dim in head_dims if dtype != "fp64" else ():
            for group in groups:
                what = f"{dtype} D={head_dim} {'MHA' if group == 1 else f'GQA {group}'}"
                call = functools.partial(_attention_launches, dtype, head_dim, group)
                out.append(("routed_attention", what, call))
        if dtype != "tf32":
            for contiguous in (True, False):
                what = f"{dtype} {'contiguous' if contiguous else 'strided'}"
                out.append(("tve", what, functools.partial(_tve_launches, dtype, contiguous)))
        if dtype not in ("tf32", "fp64"):  # the page kernels move bits: int16 or int32
            bits = f"int{_TORCH_DTYPES[dtype].itemsize * 8}"
            # BLOCK = min(1024, next_pow2(H_kv * D)): 64 .. 1024
            for kv_heads, head_dim in ((1, 64), (1, 128), (2, 128), (4, 128), (12, 128)):
                what = f"{bits} H_kv={kv_heads} D={head_dim}"
                call = functools.partial(_write_pages_launch, dtype, kv_heads, head_dim)
                out.append(("write_pages", what, call))
            out.append(
                ("copy_pages", f"{bits} pages", functools.partial(_copy_pages_launch, dtype))
            )
    return [s for s in out if s[0] in kernels]


# --- jobs: one compile each -----------------------------------------------------------------


@dataclass
class Job:
    """One compile: a kernel specialised as a launch gave it, with one config's options."""

    arch: int
    kernel: str  # module.function
    scenario: str
    fn: object = field(repr=False)
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: dict = field(repr=False)
    options: dict
    params: str  # the constexprs that vary, for the table
    pickable: bool
    shared_bound: int | None = None  # the launcher's bound, where its pruning uses one
    error: str | None = None


def _specialisation(fn, backend_cls, arguments: dict):
    """Triton's signature, constexprs and attributes of a launch, as ``JITFunction.run``
    computes them."""
    from triton._C.libtriton import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(
            backend_cls,
            value,
            False,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        if kind == "constexpr":  # integers equal to 1
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        signature[param.name] = kind
        if isinstance(key, str):
            attrs[(i,)] = backend_cls.parse_attr(key)
    return signature, constexprs, attrs


def _shown(value) -> str:
    return str(value).replace("triton.language.", "")


def _shared_bound(fn, arch: int, arguments: dict, options: dict) -> int | None:
    """The bound routed attention's pruning compares with the device's shared memory."""
    from kvpo_kernels.ops.triton import routed_attention as ra

    if fn.fn.__module__ != ra.__name__ or "BLOCK_N" not in arguments:
        return None
    return ra.shared_memory_bound(
        fn.__name__,
        elem_bytes=arguments["Q"].element_size(),
        precision=arguments["PRECISION"],
        capability=arch,
        block_d=arguments["BLOCK_D"],
        block_m=arguments["BLOCK_M"],
        block_n=arguments["BLOCK_N"],
        num_stages=options.get("num_stages", 3),
    )


def jobs_of(launch: Launch, arch: int, scenario: str) -> list[Job]:
    """The jobs of a recorded launch: one per autotune config (one for a plain launch)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    fn = launch.fn
    backend_cls = type(make_backend(GPUTarget("cuda", arch, 32)))
    base = {k: v for k, v in launch.kwargs.items() if k not in ("grid", "warmup")}
    kernel = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
    out = []
    for config in launch.configs or [None]:
        kwargs, options = dict(base), {}
        if config is not None:
            for k, v in config.all_kwargs().items():
                (kwargs if k in fn.arg_names else options)[k] = v
        arguments = fn.signature.bind(*launch.args, **kwargs)
        arguments.apply_defaults()
        signature, constexprs, attrs = _specialisation(fn, backend_cls, arguments.arguments)
        shown = {
            fn.arg_names[i]: _shown(v)
            for (i,), v in constexprs.items()
            if fn.params[i].is_constexpr
        }
        params = " ".join(f"{k}={v}" for k, v in shown.items())
        params += f" w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"
        out.append(
            Job(
                arch=arch,
                kernel=kernel,
                scenario=scenario,
                fn=fn,
                signature=signature,
                constexprs=constexprs,
                attrs=attrs,
                options=options,
                params=params.strip(),
                pickable=config is None or any(config is c for c in launch.pickable),
                shared_bound=_shared_bound(fn, arch, arguments.arguments, options),
                error=launch.error,
            )
        )
    return out


def collect_jobs(
    archs=ARCHS,
    dtypes=DTYPES,
    head_dims=HEAD_DIMS,
    kernels=KERNEL_MODULES,
    groups=GROUPS,
    pickable_only=False,
) -> list[Job]:
    """Every distinct compile (kernel, specialisation, options, arch) the scenarios launch."""
    seen: dict[tuple, Job] = {}
    for arch in archs:
        for _, what, call in scenarios(dtypes, head_dims, kernels, groups):
            with _recording(arch) as launches:
                call()
            for launch in launches:
                for job in jobs_of(launch, arch, what):
                    key = (
                        arch,
                        job.kernel,
                        repr(job.signature),
                        repr(job.constexprs),
                        repr(job.attrs),
                        repr(sorted(job.options.items())),
                    )
                    if key in seen:
                        seen[key].pickable |= job.pickable
                        seen[key].error = seen[key].error or job.error
                    else:
                        seen[key] = job
    jobs = list(seen.values())
    return [j for j in jobs if j.pickable] if pickable_only else jobs
