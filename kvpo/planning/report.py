"""The text ``kvpo plan`` prints: candidates, the resident set, each phase's lines, the choice.

Sizes are in GiB, or in MiB when every candidate peaks below 1 GiB (the toy run).
"""

from __future__ import annotations

from kvpo.planning.choose import CONTEXT_BYTES, FRAGMENTATION, Choice
from kvpo.planning.externals import Setup
from kvpo.planning.phases import MemoryPlan

GIB, MIB = ("GiB", 2**30), ("MiB", 2**20)


def _n(n: int, unit) -> str:
    return f"{n / unit[1]:9.2f}"


def candidates_table(choice: Choice, unit=GIB) -> list[str]:
    """One row per ``row_micro_batch`` candidate: rows, pool, peak, worst phase, fits."""
    lines = [
        f"{'row_micro_batch':<17}{'rows':>5}{'K/V pool':>11}{'peak':>11}  worst phase ({unit[0]})"
    ]
    for value, plan in choice.candidates.items():
        pool = next(line.bytes for line in plan.resident if line.what.startswith("K/V page pool"))
        name, peak = plan.peak
        fits = "fits" if choice.usable is None or peak <= choice.usable else "over"
        label = f"{value} (all)" if value == 0 else str(value)
        row = f"{label:<17}{plan.rows:>5}{_n(pool, unit):>11}{_n(peak, unit):>11}  {name:<24}"
        lines.append(row + fits)
    return lines


def plan_lines(plan: MemoryPlan, usable: int | None, unit=GIB) -> list[str]:
    """The resident set and every phase of ``plan``, with each line's basis."""
    width = 60
    out = [f"{'resident for the whole run':<{width}}{unit[0]:>9}  basis"]
    for line in plan.resident:
        note = f"  ({line.note})" if line.note else ""
        out.append(f"  {line.what:<{width - 2}}{_n(line.bytes, unit)}  {line.basis}{note}")
    out.append(f"  {'= resident':<{width - 2}}{_n(plan.resident_bytes, unit)}")
    out += ["", f"{'phase = resident + its lines':<{width}}{unit[0]:>9}"]
    for phase in plan.phases:
        total = plan.total(phase)
        flag = "" if usable is None else ("  fits" if total <= usable else "  OVER")
        out.append(f"{phase.name:<{width}}{_n(total, unit)}{flag}")
        for line in phase.lines:
            note = f"  ({line.note})" if line.note else ""
            out.append(f"  + {line.what:<{width - 4}}{_n(line.bytes, unit)}  {line.basis}{note}")
    held = ", ".join(f"{k} {v / unit[1]:.2f}" for k, v in plan.kv_held.items())
    out += ["", f"K/V held by the rollout ({unit[0]}, upper bound): {held}"]
    out += [f"note: {n}" for n in plan.notes]
    return out


def report(choice: Choice, setup: Setup, total: int, source: str) -> str:
    """The whole ``kvpo plan`` output."""
    m = setup.model
    unit = MIB if max(p.peak[1] for p in choice.candidates.values()) < 2**30 else GIB
    head = [
        f"memory plan of {source}: {setup.model_note}, {m.num_layers} layers x {m.dim}, "
        f"{m.tokens_per_frame} tokens per frame, {setup.dtype}",
        f"device memory {total / 2**30:.2f} GiB; usable {choice.usable / 2**30:.2f} GiB "
        f"({CONTEXT_BYTES / 2**30:g} GiB CUDA context, then {FRAGMENTATION:.0%} allocator "
        "fragmentation)",
        "predictions, not measurements: see docs/memory.md for each formula",
        "",
        *candidates_table(choice, unit),
        "",
    ]
    which = "chosen" if choice.fits else "the smallest; nothing fits"
    body = [f"plan at row_micro_batch={choice.row_micro_batch} ({which}):", ""]
    body += plan_lines(choice.plan, choice.usable, unit)
    tail = ["", ("choice: " if choice.fits else "does not fit: ") + choice.message]
    if choice.options:
        tail += ["options tried:"] + [f"  {line}" for line in choice.options]
    return "\n".join(head + body + tail)
