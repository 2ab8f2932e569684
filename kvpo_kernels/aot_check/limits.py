"""What a thread block may use on an A100 (sm_80) and an H100/H200 (sm_90), the result of one
compiled configuration, and the verdicts on it: whether it can launch and whether it fails the
check."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


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


@dataclass
class Result:
    """One configuration compiled for one arch: its resources and what stops it launching."""

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

    @classmethod
    def from_dict(cls, saved: dict) -> Result:
        """The result saved as ``saved`` (``asdict``, possibly with the properties added)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

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


def failures(results: list[Result]) -> list[Result]:
    """What fails the check: configurations the launchers can pick that cannot launch (or do
    not compile), and kernels compiled to more shared memory than the bound their launcher
    prunes by (a device with a limit in between would be offered a config that cannot launch)."""
    return [
        r for r in results if (r.pickable and not r.launchable) or r.above_bound or r.launch_error
    ]


def failure_reasons(result: Result) -> list[str]:
    """Why ``result`` is among the :func:`failures`."""
    why = list(result.problems) if result.pickable or result.launch_error else []
    if result.above_bound:
        why.append(
            f"shared memory {result.shared} B above the pruning bound {result.shared_bound} B"
        )
    return why
