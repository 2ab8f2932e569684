"""Bytes a call allocates, measured: the check of the planner's predictions.

:func:`measure` runs a function once and reports, relative to what was allocated before it,
the **peak** and the **net** bytes (still allocated when it returns: its result and, for a
grad-carrying forward, what autograd saved). CUDA: the caching allocator's statistics. CPU: the
running sum of the profiler's allocation events in time order (``profile_memory=True``), the
method of ``benchmarks/harness.py``'s ``peak_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Measurement:
    """``peak`` and ``net`` bytes above the level before the call, and the call's result."""

    peak: int
    net: int
    result: Any = None


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu") -> Measurement:
    """Run ``fn()`` once and measure its allocations (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return Measurement(peak, torch.cuda.memory_allocated(device) - before, result)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return Measurement(peak, level, result)
