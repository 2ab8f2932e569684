"""Paired before/after statistics of held-out rewards, and the summary table the trainer prints.

Each held-out video is one ``(prompt, seed)`` pair, generated with the same prompt and the same
noise before and after training, so the comparison is paired: per reward component ``k`` the
difference ``d_i = after_i - before_i`` over the ``n`` pairs has mean ``mean(d)`` and standard
error ``std(d, ddof=1) / sqrt(n)``; ``z = mean(d) / se``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class PairedStat:
    """Before/after summary of one reward over ``n`` paired videos."""

    name: str
    n: int
    before: float
    after: float
    diff: float
    se: float

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.diff / self.se
        return 0.0 if self.diff == 0 else math.copysign(math.inf, self.diff)

    def to_dict(self) -> dict:
        return {**asdict(self), "z": self.z}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def paired_stat(name: str, before: list[float], after: list[float]) -> PairedStat:
    """Paired mean difference and its standard error (``before[i]`` pairs with ``after[i]``)."""
    if len(before) != len(after) or not before:
        raise ValueError(
            f"{name}: need the same positive number of paired values, got {len(before)} before "
            f"and {len(after)} after"
        )
    diffs = [a - b for a, b in zip(after, before)]
    n = len(diffs)
    mean = _mean(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return PairedStat(name, n, _mean(before), _mean(after), mean, math.sqrt(var / n))


def with_total(scores: dict[str, list[float]], weights: dict[str, float]) -> dict[str, list[float]]:
    """Add ``"total"``: the weighted sum of the weighted components, per video."""
    n = len(next(iter(scores.values())))
    total = [sum(w * scores[k][i] for k, w in weights.items()) for i in range(n)]
    return {**scores, "total": total}


def paired_summary(
    before: dict[str, list[float]], after: dict[str, list[float]], weights: dict[str, float]
) -> list[PairedStat]:
    """One :class:`PairedStat` per component of ``before`` and one for the weighted total."""
    b, a = with_total(before, weights), with_total(after, weights)
    return [paired_stat(name, b[name], a[name]) for name in b]


def format_summary(stats: list[PairedStat], title: str = "held-out rewards") -> str:
    """A plain-text table: reward, before, after, difference +- SE, z."""
    header = f"{'reward':<18} {'before':>8} {'after':>8} {'after-before':>14} {'+-SE':>8} {'z':>7}"
    lines = [f"{title} (n = {stats[0].n} paired prompt x seed videos)", header, "-" * len(header)]
    for s in stats:
        lines.append(
            f"{s.name:<18} {s.before:>8.4f} {s.after:>8.4f} {s.diff:>+14.4f} {s.se:>8.4f} "
            f"{s.z:>7.2f}"
        )
    return "\n".join(lines)
