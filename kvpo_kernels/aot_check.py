"""Ahead-of-time compile check of the Triton kernels, on a machine without a GPU.

Every Triton kernel is compiled, in every configuration its launcher can give it, by Triton's own
compiler (``triton.compile`` of an ``ASTSource``, then the ``ptxas`` shipped in the Triton wheel)
for sm_80 (A100) and sm_90 (H100/H200). For each configuration it reports the shared memory
(``metadata.shared``), the registers per thread and the spills (``ptxas -v``), whether the dots
use tensor cores (``wgmma`` / ``mma`` in the PTX), and whether a block can launch on the GPU:

- shared memory <= what a block may opt into (227 KiB on sm_90, 163 KiB on sm_80);
- registers <= 255 per thread and ``num_warps * 32 * regs`` (allocated per warp in units of 256)
  <= 65536 per block; ``num_warps * 32`` <= 1024 threads.

The configurations are not listed here by hand: the real launchers
(:mod:`kvpo_kernels.ops.triton`) are called with ``meta`` tensors of representative shapes
(dtypes, head dims 64 and 128, MHA and GQA, contiguous and strided TVE items, page rows of 64 to
1024 elements) while ``Autotuner.run`` and ``JITFunction.run`` are replaced by recorders. A
recorded autotuned launch expands to all of the kernel's autotune configs; those its
``early_config_prune`` keeps for the arch (compute capability and shared-memory limit) are
*pickable*, the others *pruned*. The argument specialisation (pointer and integer divisibility
by 16, integers equal to 1) is Triton's own (``native_specialize_impl``), as in a real launch
with 16-byte aligned tensors. *tf32* is fp32 tensors with TF32 allowed for fp32 matmuls.

The check fails (exit status 1) when a pickable configuration cannot launch or does not compile,
when a launcher's pruning fails, or when a kernel compiles to more shared memory than the bound
routed attention prunes by (:func:`kvpo_kernels.ops.triton.routed_attention.shared_memory_bound`;
a device whose limit lay between the two would be offered a config that cannot launch). Pruned
configurations are compiled too, unless ``--pickable-only``, to show why they are pruned.

    python -m kvpo_kernels.aot_check [--arch 80 90] [--dtypes bf16 fp16 fp32 tf32 fp64]
        [--head-dims 64 128] [--groups 1 4] [--kernels routed_attention tve write_pages
        copy_pages] [--pickable-only] [--jobs 1] [--nice 10] [--json out.json]
        [--markdown out.md]

Tested with Triton 3.6.0 and 3.7.1.

``TRITON_INTERPRET=1`` turns ``@triton.jit`` kernels into interpreted functions when they are
defined, so ``main`` runs itself again without it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from unittest import mock

import torch

ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32", "tf32", "fp64")
HEAD_DIMS = (64, 128)
GROUPS = (1, 4)  # query heads per K/V head: MHA (the Wan models) and GQA
KERNEL_MODULES = ("routed_attention", "tve", "write_pages", "copy_pages")


@dataclass(frozen=True)
class Limits:
    """What one thread block may use on a GPU of compute capability ``arch``."""

    gpu: str
    shared_per_block: int  # bytes of dynamic shared memory a block may opt into
    shared_per_sm: int
    regs_per_thread: int = 255
    regs_per_block: int = 65536
    regs_per_sm: int = 65536
    threads_per_block: int = 1024
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


LIMITS = {
    80: Limits("A100", shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    90: Limits("H100/H200", shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}
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
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = before
    else:
        before = matmul.allow_tf32
        matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            matmul.allow_tf32 = before


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


# --- compile and check ----------------------------------------------------------------------


@dataclass
class Result:
    arch: int
    kernel: str
    scenario: str
    params: str
    pickable: bool
    shared_bound: int | None = None
    shared: int | None = None
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    num_warps: int | None = None
    tensor_cores: str | None = None
    ctas_per_sm: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    launch_error: str | None = None  # the launcher's pruning failed

    @property
    def launchable(self) -> bool:
        return not self.problems

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    @property
    def above_bound(self) -> bool:
        """Compiled to more shared memory than the bound its launcher prunes by."""
        return None not in (self.shared, self.shared_bound) and self.shared > self.shared_bound

    @property
    def picked(self) -> str:
        if self.pickable:
            return "yes"
        return "pruned (would fit)" if self.shared is not None and self.launchable else "pruned"


_PROPERTIES = re.compile(
    r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)
_REGISTERS = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", re.S)


def parse_ptxas_log(log: str, name: str) -> tuple[int, int, int, int]:
    """``(registers, spill store bytes, spill load bytes, stack bytes)`` of entry ``name``."""
    regs = next((int(m[2]) for m in _REGISTERS.finditer(log) if m[1] == name), None)
    props = next((m for m in _PROPERTIES.finditer(log) if m[1] == name), None)
    if regs is None or props is None:
        raise ValueError(f"no ptxas -v report for {name} in:\n{log}")
    return regs, int(props[3]), int(props[4]), int(props[2])


def check_limits(result: Result, limits: Limits) -> None:
    """Fill ``problems`` (what stops a launch) and ``ctas_per_sm`` from the compiled numbers."""
    threads = result.num_warps * 32
    regs_per_block = math.ceil(result.regs * 32 / 256) * 256 * result.num_warps
    if result.shared > limits.shared_per_block:
        result.problems.append(
            f"shared memory {result.shared} B > {limits.shared_per_block} B per block"
        )
    if result.regs > limits.regs_per_thread:
        result.problems.append(f"{result.regs} registers > {limits.regs_per_thread} per thread")
    if regs_per_block > limits.regs_per_block:
        result.problems.append(f"{regs_per_block} registers > {limits.regs_per_block} per block")
    if threads > limits.threads_per_block:
        result.problems.append(f"{threads} threads > {limits.threads_per_block} per block")
    if result.problems:
        result.ctas_per_sm = 0
        return
    by_shared = limits.shared_per_sm // (result.shared + 1024)  # 1 KiB reserved per block
    result.ctas_per_sm = min(
        limits.blocks_per_sm,
        limits.threads_per_sm // threads,
        limits.regs_per_sm // max(regs_per_block, 1),
        by_shared,
    )


def compile_job(job: Job) -> Result:
    """Compile ``job`` with ``triton.compile`` for its arch and check it against the limits."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    result = Result(job.arch, job.kernel, job.scenario, job.params, job.pickable, job.shared_bound)
    if job.error:
        result.launch_error = job.error
        result.problems.append(job.error)
        return result
    start = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed: captured below
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    try:
        src = ASTSource(job.fn, job.signature, job.constexprs, job.attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options)
            )
        result.regs, result.spill_stores, result.spill_loads, result.stack = parse_ptxas_log(
            log.getvalue(), compiled.metadata.name
        )
    except Exception as e:  # a failed compile is a result
        result.problems.append(f"compile failed: {type(e).__name__}: {str(e)[:400]}")
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    result.shared = compiled.metadata.shared
    result.num_warps = compiled.metadata.num_warps
    ptx = compiled.asm["ptx"]
    result.tensor_cores = "wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else "-"
    check_limits(result, LIMITS[job.arch])
    return result


_JOBS: list[Job] = []


def _compile_index(i: int) -> Result:
    return compile_job(_JOBS[i])


def run_jobs(jobs: list[Job], workers: int = 1, progress=None) -> list[Result]:
    """Compile every job (in ``workers`` forked processes when > 1), in the jobs' order."""
    from triton import knobs

    results = []
    with tempfile.TemporaryDirectory(prefix="kvpo-aot-") as cache:
        knobs.cache.dir = cache  # every compile is fresh; keep ~/.triton/cache clean
        if workers <= 1:
            for job in jobs:
                results.append(compile_job(job))
                if progress:
                    progress(results[-1], len(results), len(jobs))
        else:
            import multiprocessing

            _JOBS[:] = jobs
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for result in pool.imap(_compile_index, range(len(jobs))):
                    results.append(result)
                    if progress:
                        progress(result, len(results), len(jobs))
    return results


def _key(x: Job | Result) -> str:
    return f"sm_{x.arch} {x.kernel} {x.scenario} {x.params}"


def _run_resumable(jobs: list[Job], workers: int, json_path: Path | None) -> list[Result]:
    """``run_jobs`` that appends each result to ``<json>.partial`` (one JSON object a line) and
    takes the results already there instead of compiling them again: a long run that is
    interrupted resumes where it stopped. The partial file goes once the run is complete."""
    partial = json_path.with_name(json_path.name + ".partial") if json_path else None
    done: dict[str, Result] = {}
    if partial and partial.exists():
        names = {f.name for f in fields(Result)}
        for line in partial.read_text().splitlines():
            result = Result(**{k: v for k, v in json.loads(line).items() if k in names})
            done[_key(result)] = result
    todo = [j for j in jobs if _key(j) not in done]
    resumed = f" ({len(jobs) - len(todo)} done in {partial})" if len(todo) < len(jobs) else ""
    print(f"{len(todo)} configurations to compile{resumed}", flush=True)

    def progress(result: Result, count: int, total: int) -> None:
        if partial:
            with partial.open("a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
        _progress(result, count, total)

    for result in run_jobs(todo, workers, progress):
        done[_key(result)] = result
    if partial:
        partial.unlink(missing_ok=True)
    return [done[_key(j)] for j in jobs]


def failures(results: list[Result]) -> list[Result]:
    """What fails the check: configurations the launchers can pick that cannot launch (or do
    not compile), and kernels compiled to more shared memory than the bound their launcher
    prunes by (a device with a limit in between would be offered a config that cannot launch)."""
    return [
        r for r in results if (r.pickable and not r.launchable) or r.above_bound or r.launch_error
    ]


# --- reports --------------------------------------------------------------------------------


def versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    info = {"triton": triton.__version__, "torch": torch.__version__}
    try:
        out = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True)
        info["ptxas"] = re.findall(r"release ([\d.]+)", out.stdout)[0]
    except (OSError, IndexError):
        info["ptxas"] = "unknown"
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "kvpo_kernels"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["commit"] = commit + (" (kvpo_kernels modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def summary_rows(results: list[Result]) -> list[dict]:
    """Per arch, kernel and dtype: counts, spills and the largest resources."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.kernel, r.scenario.split()[0]), []).append(r)
    rows = []
    for (arch, kernel, dtype), rs in groups.items():
        picked = [r for r in rs if r.pickable]
        compiled = [r for r in rs if r.shared is not None]
        rows.append(
            {
                "arch": arch,
                "kernel": kernel,
                "dtype": dtype,
                "configs": len(rs),
                "pickable": len(picked),
                "pruned": len(rs) - len(picked),
                "not_launchable": sum(not r.launchable for r in rs),
                "pickable_not_launchable": sum(not r.launchable for r in picked),
                "spilling": sum(r.spills for r in rs),
                "pickable_spilling": sum(r.spills for r in picked),
                "max_shared": max((r.shared for r in compiled), default=0),
                "max_regs": max((r.regs for r in compiled), default=0),
                "tensor_cores": "/".join(sorted({r.tensor_cores for r in compiled})),
                "seconds": round(sum(r.seconds for r in rs), 1),
            }
        )
    return rows


def _or_dash(n) -> str:
    return "-" if n is None else str(n)


def _fp32_paragraph(results: list[Result]) -> list[str]:
    """What the tables say about fp32 attention, with the counts of this run."""
    attention = [r for r in results if r.shared_bound is not None]
    ieee = [r for r in attention if "PRECISION=ieee" in r.params]
    tf32 = [r for r in attention if r.scenario.startswith("tf32")]
    if not ieee and not tf32:
        return []
    lines = ["", "## fp32 attention on a GPU", ""]
    if ieee:
        picked = [r for r in ieee if r.pickable]
        too_big = sum(not r.launchable for r in ieee if r.shared is not None)
        shortage = (
            f", and {too_big} need more shared memory than a block may have (pruned)"
            if too_big
            else ""
        )
        starved = [r for r in ieee if r.regs == 32 and r.spills]
        worst = max((r.spill_stores + r.spill_loads for r in ieee if r.spills), default=0)
        detail = (
            f" ptxas gives {len(starved)} of them only 32 registers; the largest spill traffic "
            f"is {worst} B (stores + loads)."
            if starved
            else ""
        )
        lines.append(
            "With PyTorch's default fp32 matmul precision the attention dots of fp32 tensors run "
            "in ieee precision: exact fp32 FMAs on CUDA cores, no tensor cores. "
            f"{sum(r.spills for r in ieee)} of the {len(ieee)} ieee configurations compiled here "
            f"spill registers ({sum(r.spills for r in picked)} of the {len(picked)} "
            f"pickable){shortage}.{detail} The pruning tries only their 8-warp configurations, "
            "which spill least. fp32 attention works on a GPU, but slowly."
        )
        lines.append("")
    lines.append(
        'Setting `torch.backends.cuda.matmul.fp32_precision = "tf32"` (or '
        '`torch.set_float32_matmul_precision("high")`) makes the Triton attention kernels '
        "compute fp32 dots in TF32 on tensor cores (10-bit mantissa products, fp32 "
        "accumulation), as PyTorch's own fp32 matmuls do under that setting; the *tf32* rows "
        "below are those kernels. bf16, the dtype of the models' real configs, is the fast "
        "path."
    )
    return lines


def markdown(results: list[Result], info: dict, command: str) -> str:
    limits = "; ".join(
        f"sm_{a} ({lim.gpu}): {lim.shared_per_block // 1024} KiB of shared memory, "
        f"({lim.shared_per_block} B), {lim.regs_per_thread} registers per thread, "
        f"{lim.regs_per_block} per block"
        for a, lim in LIMITS.items()
    )
    lines = [
        "# Triton kernel resources (ahead-of-time compile)",
        "",
        f"Generated by `{command}` at commit {info['commit']} with Triton {info['triton']} "
        f"(ptxas {info['ptxas']}) and torch {info['torch']}, on a machine without a GPU; "
        "`kvpo_kernels/aot_check.py` describes the method. Every configuration the launchers "
        "can give a kernel is compiled for each arch and checked against its limits per thread "
        f"block ({limits}).",
        "",
        "- *pickable*: routed attention's autotune pruning keeps the configuration on that arch "
        "(its shared-memory bound fits the device); pruned ones are listed to show why, *would "
        "fit* when the bound was cautious. The check fails if a pickable configuration cannot "
        "launch or a kernel exceeds the bound.",
        "- *spill st/ld*: ptxas's spill stores / loads in bytes; *tensor cores*: `wgmma` "
        "(sm_90), `mma` (sm_80) or none; *CTAs/SM*: the occupancy the limits allow.",
        "- *launched as*: dtype (*tf32*: fp32 tensors with TF32 matmuls allowed), head dim, MHA "
        "or GQA group, TVE layout, page row size.",
        *_fp32_paragraph(results),
        "",
        "## Summary",
        "",
        "| arch | kernel | dtype | configs | pickable | pruned | cannot launch (pickable) "
        "| spilling (pickable) | max shared B | max regs | tensor cores | compile s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in summary_rows(results):
        lines.append(
            f"| sm_{s['arch']} | {s['kernel']} | {s['dtype']} | {s['configs']} | {s['pickable']} "
            f"| {s['pruned']} | {s['not_launchable']} ({s['pickable_not_launchable']}) "
            f"| {s['spilling']} ({s['pickable_spilling']}) | {s['max_shared']} "
            f"| {s['max_regs']} | {s['tensor_cores']} | {s['seconds']} |"
        )
    for arch in sorted({r.arch for r in results}):
        lines += [
            "",
            f"## sm_{arch} ({LIMITS[arch].gpu}), every configuration",
            "",
            "| kernel | launched as | constexprs, warps, stages | pickable | shared B "
            "| bound B | regs | spill st/ld B | tensor cores | CTAs/SM | launches | compile s |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |",
        ]
        for r in (r for r in results if r.arch == arch):
            spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
            verdict = "yes" if r.launchable else "**no**: " + "; ".join(r.problems)
            lines.append(
                f"| {r.kernel} | {r.scenario} | {r.params} | {r.picked} | {_or_dash(r.shared)} "
                f"| {_or_dash(r.shared_bound)} | {_or_dash(r.regs)} | {spill} "
                f"| {r.tensor_cores or '-'} | {_or_dash(r.ctas_per_sm)} | {verdict} "
                f"| {r.seconds:.1f} |"
            )
    return "\n".join(lines) + "\n"


_OUTPUT_OPTIONS = ("--json", "--markdown", "--report-from", "--jobs", "--nice")


def reproducing_command(argv: list[str]) -> str:
    """The command line of a run without the options that do not change its results."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OUTPUT_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _OUTPUT_OPTIONS)):
            kept.append(arg)
    return " ".join(["python -m kvpo_kernels.aot_check", *kept])


def load_results(path: Path) -> tuple[list[Result], dict, str]:
    """``(results, versions, command)`` of a run saved with ``--json``."""
    saved = json.loads(path.read_text())
    names = {f.name for f in fields(Result)}
    results = [Result(**{k: v for k, v in r.items() if k in names}) for r in saved["results"]]
    return results, saved["versions"], reproducing_command(saved["command"].split()[3:])


def _progress(result: Result, done: int, total: int) -> None:
    spill = "" if not result.spills else f" spills {result.spill_stores}/{result.spill_loads} B"
    state = "ok" if result.launchable else "CANNOT LAUNCH: " + "; ".join(result.problems)
    print(
        f"[{done}/{total}] sm_{result.arch} {result.kernel} {result.scenario} {result.params}"
        f"{'' if result.pickable else ' (pruned)'}: shared {result.shared} B, regs "
        f"{result.regs}{spill}, {result.seconds:.1f} s, {state}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run(
            [sys.executable, "-m", "kvpo_kernels.aot_check", *argv], env=env
        ).returncode
    parser = argparse.ArgumentParser(
        prog="python -m kvpo_kernels.aot_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=list(DTYPES),
        choices=DTYPES,
        help="tf32: fp32 tensors with TF32 matmuls allowed",
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument(
        "--groups",
        type=int,
        nargs="+",
        default=list(GROUPS),
        help="GQA group sizes of routed attention (1: MHA)",
    )
    parser.add_argument(
        "--kernels", nargs="+", default=list(KERNEL_MODULES), choices=KERNEL_MODULES
    )
    parser.add_argument(
        "--pickable-only",
        action="store_true",
        help="compile only the configurations the launchers can pick",
    )
    parser.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    parser.add_argument("--nice", type=int, default=10, help="niceness increment (default 10)")
    parser.add_argument(
        "--json",
        type=Path,
        help="write every result as JSON (an interrupted run resumes from <json>.partial)",
    )
    parser.add_argument("--markdown", type=Path, help="write the resource tables as Markdown")
    parser.add_argument(
        "--report-from",
        type=Path,
        help="report a run saved with --json instead of compiling (other options ignored)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.report_from:
        results, info, command = load_results(args.report_from)
    else:
        os.nice(args.nice)
        from kvpo_kernels import registry

        if registry.TRITON_INTERPRET:
            raise RuntimeError("TRITON_INTERPRET was set when kvpo_kernels was imported")
        jobs = collect_jobs(
            args.arch, args.dtypes, args.head_dims, args.kernels, args.groups, args.pickable_only
        )
        results = _run_resumable(jobs, args.jobs, args.json)
        info, command = versions(), reproducing_command(argv)
    elapsed = time.perf_counter() - start
    if args.json and not args.report_from:
        args.json.write_text(
            json.dumps(
                {
                    "versions": info,
                    "command": command,
                    "results": [
                        {**asdict(r), "launchable": r.launchable, "above_bound": r.above_bound}
                        for r in results
                    ],
                },
                indent=1,
            )
        )
    if args.markdown:
        args.markdown.write_text(markdown(results, info, command))
    print()
    for s in summary_rows(results):
        print(
            f"sm_{s['arch']} {s['kernel']} {s['dtype']}: {s['configs']} configs, "
            f"{s['pickable']} pickable, {s['pruned']} pruned, {s['not_launchable']} cannot "
            f"launch ({s['pickable_not_launchable']} pickable), {s['spilling']} spill "
            f"({s['pickable_spilling']} pickable), max shared {s['max_shared']} B, max regs "
            f"{s['max_regs']}, tensor cores {s['tensor_cores']}, {s['seconds']} s"
        )
    bad = failures(results)
    for r in bad:
        why = list(r.problems) if r.pickable or r.launch_error else []
        if r.above_bound:
            why.append(f"shared memory {r.shared} B above the pruning bound {r.shared_bound} B")
        print(f"FAIL sm_{r.arch} {r.kernel} {r.scenario} {r.params}: {'; '.join(why)}")
    print(
        f"{len(results)} configurations {'reported' if args.report_from else 'compiled'} in "
        f"{elapsed:.0f} s; {len(bad)} failures (pickable configurations that cannot launch, "
        "kernels above their pruning bound)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
