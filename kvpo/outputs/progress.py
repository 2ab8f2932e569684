"""Progress of the step loop: a tqdm bar on a terminal, plain lines everywhere else.

When ``stream.isatty()`` (an interactive terminal) the steps are a tqdm bar with the latest
values as its postfix, and :meth:`Progress.phases` adds a transient bar over one step's phases.
Otherwise (a log file, CI) every ``every`` steps, and at the last, one line is printed::

    step 40/100  reward 0.512  loss 0.0123  3.4 s/step  eta 3m24s

(floats to 3 significant digits; seconds per step averaged since the start, over the steps run
in this process) and no carriage return is ever written. ``enabled=False`` (ranks other than
0) prints nothing at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """``45s``, ``3m24s``, ``2h05m`` (rounded to whole seconds)."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_value(value) -> str:
    """A postfix value: floats to 3 significant digits, anything else as ``str``."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class Progress:
    """Steps ``initial + 1 .. total`` of a run; call :meth:`update` after each with the number
    of steps done so far and the values to show (``reward=0.512, loss=0.0123``; None: not shown).

    ``clock``: seconds, monotonic (injectable for tests); ``stream``: where everything goes.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        every: int = 10,
        enabled: bool = True,
        stream: TextIO | None = None,
        desc: str = "KVPO",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.initial, self.every = total, initial, max(1, every)
        self.enabled = enabled
        self.stream = sys.stdout if stream is None else stream
        self.clock = clock
        self.interactive = enabled and self.stream.isatty()
        self._start = clock()
        self._bar = None
        if self.interactive:
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, step: int, **postfix) -> None:
        """``step`` steps are done (``initial < step <= total``); show ``postfix``."""
        if not self.enabled:
            return
        shown = {k: format_value(v) for k, v in postfix.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self.line(step, shown) + "\n")
            self.stream.flush()

    def line(self, step: int, shown: dict[str, str]) -> str:
        """``step 40/100  reward 0.512  ...  3.4 s/step  eta 3m24s`` (no timing before a step
        is done in this process)."""
        parts = [f"step {step}/{self.total}", *(f"{k} {v}" for k, v in shown.items())]
        done = step - self.initial
        if done > 0:
            per_step = (self.clock() - self._start) / done
            parts.append(f"{per_step:.3g} s/step")
            parts.append(f"eta {format_duration(per_step * (self.total - step))}")
        return "  ".join(parts)

    def write(self, message: str) -> None:
        """Print ``message`` on its own line (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    @contextmanager
    def phases(self, names: Sequence[str], desc: str = "") -> Iterator[tqdm | None]:
        """A transient bar over the phases ``names`` of one step (for the trainer's
        ``PhaseTimer``, which advances it and names the running phase), or None when not on a
        terminal."""
        if not self.interactive:
            yield None
            return
        bar = tqdm(total=len(names), desc=desc, leave=False, file=self.stream, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    def close(self) -> None:
        """Close the bar (idempotent; lines need no closing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
