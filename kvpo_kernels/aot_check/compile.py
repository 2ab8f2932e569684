"""Triton's ahead-of-time compilation of the jobs: ``triton.compile`` of an ``ASTSource`` for
the job's arch, the shared memory from the compiled metadata, registers and spills from
``ptxas -v``, tensor-core use from the PTX; in forked processes when asked, resumable from a
partial file."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .configs import Job
from .limits import LIMITS, Result, check_limits

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
    """``compile_job`` of the ``i``-th job, in a process forked with ``_JOBS`` set."""
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
    """What names a configuration in a partial file."""
    return f"sm_{x.arch} {x.kernel} {x.scenario} {x.params}"


def _run_resumable(jobs: list[Job], workers: int, json_path: Path | None) -> list[Result]:
    """``run_jobs`` that appends each result to ``<json>.partial`` (one JSON object a line) and
    takes the results already there instead of compiling them again: a long run that is
    interrupted resumes where it stopped. The partial file goes once the run is complete."""
    partial = json_path.with_name(json_path.name + ".partial") if json_path else None
    done: dict[str, Result] = {}
    if partial and partial.exists():
        for line in partial.read_text().splitlines():
            result = Result.from_dict(json.loads(line))
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


def _progress(result: Result, done: int, total: int) -> None:
    """One line per compiled configuration, as it completes."""
    spill = "" if not result.spills else f" spills {result.spill_stores}/{result.spill_loads} B"
    state = "ok" if result.launchable else "CANNOT LAUNCH: " + "; ".join(result.problems)
    print(
        f"[{done}/{total}] sm_{result.arch} {result.kernel} {result.scenario} {result.params}"
        f"{'' if result.pickable else ' (pruned)'}: shared {result.shared} B, regs "
        f"{result.regs}{spill}, {result.seconds:.1f} s, {state}",
        flush=True,
    )
