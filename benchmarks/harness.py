"""Shared benchmark harness: timing, peak memory, result files.

Every suite measures its providers (the eager PyTorch baseline among them) in the same run and
records one row per (case, provider). Rows go to ``benchmarks/results/<suite>-<device>.json``
tagged with the git sha, torch/triton versions and device; ``python -m benchmarks.report``
renders the latest files as ratio tables in ``benchmarks/RESULTS.md``. Nothing here asserts a
timing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Row:
    """One measured (case, provider) pair."""

    suite: str
    case: str
    provider: str
    baseline: bool
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_bytes: int | None = None
    held_bytes: int | None = None
    extra: dict = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 2,
    reps: int = 7,
    min_time_s: float = 0.2,
) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) wall time of ``fn`` in ms.

    CPU: ``warmup`` untimed calls, then at least ``reps`` timed calls (more until ``min_time_s``).
    CUDA: ``triton.testing.do_bench`` (CUDA events, cache flushed between calls).
    """
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


class AllocationPeak:
    """``with AllocationPeak(device) as peak: ...``; then ``peak.bytes``: the peak bytes
    allocated inside the block above what was allocated when it began, and ``peak.net``: what is
    still allocated at its end (a call's result and, for a grad-carrying forward, what autograd
    saved).

    CUDA: the caching allocator's statistics. CPU: the running sum of the profiler's allocation
    events (``profile_memory=True``), in time order.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device, self.bytes, self.net = torch.device(device), 0, 0

    def __enter__(self) -> AllocationPeak:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
            self.net = torch.cuda.memory_allocated(self.device) - self._before
            return
        self._prof.__exit__(*exc)
        events = [
            e
            for e in self._prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
        events.sort(key=lambda e: e.start_ns())
        level = peak = 0
        for e in events:
            level += e.nbytes()
            peak = max(peak, level)
        self.bytes, self.net = peak, level


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it
    (:class:`AllocationPeak`)."""
    with AllocationPeak(device) as peak:
        fn()
    return peak.bytes


def git_sha() -> str:
    try:
        root = Path(__file__).parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": device_name(device),
        "device_type": device.type,
    }


class Recorder:
    """Collects rows of a benchmark session and writes one JSON file per (suite, device type)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], list[Row]] = {}
        self.meta: dict[str, dict] = {}

    def measure(
        self,
        suite: str,
        case: str,
        provider: str,
        fn: Callable[[], object],
        device: torch.device,
        *,
        baseline: bool = False,
        memory: bool = True,
        held_bytes: int | None = None,
        **extra,
    ) -> Row:
        med, p20, p80 = time_ms(fn, device)
        peak = peak_bytes(fn, device) if memory else None
        row = Row(suite, case, provider, baseline, med, p20, p80, peak, held_bytes, extra)
        self.rows.setdefault((suite, device.type), []).append(row)
        self.meta.setdefault(device.type, metadata(device))
        return row

    def write(self, directory: Path = RESULTS_DIR) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for (suite, device_type), rows in self.rows.items():
            path = directory / f"{suite}-{device_type}.json"
            payload = {"meta": self.meta[device_type], "rows": [asdict(r) for r in rows]}
            path.write_text(json.dumps(payload, indent=1) + "\n")
            paths.append(path)
        return paths


def bench_device() -> torch.device:
    """The device benchmarks run on: $KVPO_BENCH_DEVICE, else CUDA when present, else CPU."""
    name = os.environ.get("KVPO_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compiled_backends(device: torch.device) -> list[str]:
    """The non-reference backends whose timings mean something on ``device``.

    ``cpp`` and ``triton`` where usable; Triton under the CPU interpreter is left out.
    """
    from kvpo_kernels.registry import unavailable_reason

    return [
        b
        for b in ("cpp", "triton")
        if unavailable_reason(b, device.type) is None
        and not (b == "triton" and device.type == "cpu")
    ]
