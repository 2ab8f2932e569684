"""Time per phase of a training step, and the peak memory of the process or device."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Wall time per named phase of a step; ``with timer("rollout"): ...``.

    With ``bar`` (a tqdm bar over the phases of one step) each finished phase advances it and
    the bar's postfix names the running phase.
    """

    def __init__(self, device: torch.device | None = None, bar=None):
        self.device = device
        self.bar = bar
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if self.bar is not None:
                self.bar.update(1)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated bytes on ``device``; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
