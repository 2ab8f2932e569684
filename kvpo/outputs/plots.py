"""Training plots from metric records (the flat dicts of ``metrics.jsonl``, see
:mod:`kvpo.outputs.loggers`): ``reward_curve.png`` and ``training_curves.png``.

Drawn with matplotlib's object API on an Agg canvas (no pyplot: no global figure state, headless
and thread-safe). A curve is a series over the *logged* steps that carry its key: records
without it (skipped steps, evaluation records) are left out, not interpolated, and a step
logged twice (a resumed run re-logs it) keeps its last value. Steps are the records' ``step``.

Smoothing is TensorBoard's debiased exponential moving average over a series' points in step
order, weight ``w`` in [0, 1) (0: none)::

    m_i = w * m_{i-1} + (1 - w) * y_i,   m_{-1} = 0,   s_i = m_i / (1 - w ** (i + 1))

drawn as a line over the faint raw points (``s_0 = y_0``; a constant series stays constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

BRANCH, ANCHOR, EVAL, SKIP = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"
SIGNALS = ("local", "global")
TRAINING_PANELS = (  # (title, ((key, legend label), ...)); "time/" panels list every phase
    ("loss", (("loss", "loss"),)),
    ("KL", (("policy/kl_ref", "KL to reference"), ("policy/approx_kl", "approx. KL to old"))),
    (
        "clip fraction",
        (("policy/clip_fraction", "ratio outside clip"), ("advantage/clip_fraction", "advantage")),
    ),
    ("grad norm (before clipping)", (("grad_norm", "grad norm"),)),
    ("learning rate", (("lr", "lr"),)),
    ("seconds per rollout", "time/"),
)


def smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """Debiased EMA of ``values [N]`` (module docstring) -> ``[N]``."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight {weight} is not in [0, 1)")
    out, m = np.empty(len(values)), 0.0
    for i, y in enumerate(values):
        m = weight * m + (1 - weight) * float(y)
        out[i] = m / (1 - weight ** (i + 1))
    return out


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def series(
    records: Iterable[dict], key: str, reduce: Callable[[list[float]], float] = np.mean
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [N] int, values [N] float)`` of ``key`` over ``records``, by step; a list value
    (one per branch) is ``reduce``-d; non-finite values are dropped; a repeated step keeps its
    last value."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, list) and value and all(_number(v) for v in value):
            value = float(reduce(value))
        if "step" in record and _number(value):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=float)


def _skipped_steps(records: Sequence[dict]) -> list[int]:
    return sorted({int(r["step"]) for r in records if "skipped" in r and "step" in r})


def _components(records: Sequence[dict]) -> tuple[list[str], list[str], bool]:
    """``(signals present, reward components in first-seen order, any eval record)``."""
    signals, comps, has_eval = [], [], False
    for key in dict.fromkeys(k for r in records for k in r):
        parts = key.split("/")
        if parts[0] == "eval" and len(parts) == 2:
            has_eval = True
            comp = parts[1]
        elif parts[0] in {f"reward_{s}" for s in SIGNALS} and len(parts) == 3:
            signals.append(parts[0].removeprefix("reward_"))
            comp = parts[1]
        else:
            continue
        if comp != "total" and comp not in comps:
            comps.append(comp)
    return [s for s in SIGNALS if s in signals], comps, has_eval


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_yticks([])


def _curve(ax: Axes, steps, values, colour: str, label: str, gid: str, smoothing: float) -> None:
    """Faint raw points and their smoothed line (``gid``: ``<gid>/raw`` and ``<gid>/smoothed``;
    a lone point gets a marker, a line of one point being invisible)."""
    ax.plot(steps, values, lw=0.7, marker="o", ms=3.5, alpha=0.4, color=colour, gid=gid + "/raw")
    marker = "o" if len(steps) == 1 else "none"
    smoothed = smooth(values, smoothing)
    ax.plot(
        steps, smoothed, color=colour, lw=1.8, marker=marker, label=label, gid=gid + "/smoothed"
    )


def _reward_panel(ax: Axes, records, signal: str, comp: str, smoothing: float) -> bool:
    """Branch mean (with the branches' min-max band) and anchor of one component or the total."""
    mean_key, anchor_key = f"reward_{signal}/{comp}/branches", f"reward_{signal}/{comp}/anchor"
    steps, low = series(records, mean_key, min)
    if len(steps):
        _, high = series(records, mean_key, max)
        ax.fill_between(steps, low, high, color=BRANCH, alpha=0.12, lw=0, label="branch range")
    drawn = False
    for key, colour, label, name in (
        (mean_key, BRANCH, "branch mean (smoothed)", "branches"),
        (anchor_key, ANCHOR, "anchor (smoothed)", "anchor"),
    ):
        steps, values = series(records, key)
        if len(steps):
            _curve(ax, steps, values, colour, label, f"{signal}/{comp}/{name}", smoothing)
            drawn = True
    return drawn


def _eval_panel(ax: Axes, records, comp: str) -> bool:
    steps, values = series(records, f"eval/{comp}")
    if len(steps):
        ax.plot(
            steps,
            values,
            marker="D",
            ms=6,
            lw=1,
            color=EVAL,
            label="held-out eval",
            gid=f"eval/{comp}",
        )
    return bool(len(steps))


def _grid(rows: int, cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, color="0.92")
    for ax in axes[-1]:
        ax.set_xlabel("rollout")
    return fig, axes


def _step_limits(axes: np.ndarray, records: Sequence[dict]) -> None:
    """The shared x range: every logged step, at least half a step beyond the ends (a single
    step would otherwise get a range under 1 and fractional ticks)."""
    steps = [int(r["step"]) for r in records if "step" in r]
    if steps:
        low, high = min(steps), max(steps)
        pad = max(0.5, 0.03 * (high - low))
        axes.flat[0].set_xlim(low - pad, high + pad)


def _legend(fig: Figure, axes: np.ndarray) -> None:
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles))


def reward_figure(records: Sequence[dict], smoothing: float = 0.6) -> Figure:
    """A column per reward component and the total, a row per signal present (``local``,
    ``global``) plus a ``held-out eval`` row when records carry ``eval/<component>`` values
    (held-out rewards, on their own scale, so in their own row); skipped steps as dotted red
    lines. Records: see :func:`series`; keys ``reward_<signal>/<comp>/branches`` ([G] lists),
    ``.../anchor`` (``<comp>`` = ``total``: the weighted sum), ``eval/<comp>``."""
    signals, comps, has_eval = _components(records)
    if not signals and not has_eval:
        fig, axes = _grid(1, 1, 6, 3.2)
        _no_data(axes[0, 0])
        axes[0, 0].set_title("training rewards")
        return fig
    rows, cols = [*signals, *(["eval"] if has_eval else [])], [*comps, "total"]
    fig, axes = _grid(len(rows), len(cols), 3.6, 2.7)
    skipped = _skipped_steps(records)
    for r, row in enumerate(rows):
        axes[r, 0].set_ylabel("held-out eval" if row == "eval" else f"{row} reward")
        for c, comp in enumerate(cols):
            ax = axes[r, c]
            ax.set_title(f"{row}: {comp}", fontsize=10)
            if row == "eval":
                drawn = _eval_panel(ax, records, comp)
            else:
                drawn = _reward_panel(ax, records, row, comp, smoothing)
                for i, step in enumerate(skipped):
                    label = "skipped step" if i == 0 else None
                    ax.axvline(step, color=SKIP, alpha=0.5, ls=":", lw=1.2, label=label)
            if not drawn:
                _no_data(ax)
    _step_limits(axes, records)
    _legend(fig, axes)
    fig.suptitle(
        "training rewards per rollout (faint: raw values; lines: debiased EMA, weight "
        f"{smoothing:g})"
    )
    return fig


def training_figure(records: Sequence[dict], smoothing: float = 0.6) -> Figure:
    """Loss, KL, clip fractions, grad norm, learning rate and seconds per step (one line per
    ``time/<phase>``) against the step, 2 x 3 panels; a panel without data says so."""
    fig, axes = _grid(2, 3, 4.4, 3.0)
    for ax, (title, keys) in zip(axes.flat, TRAINING_PANELS):
        ax.set_title(title, fontsize=10)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        if isinstance(keys, str):  # every key under this prefix, e.g. the phases' seconds
            names = dict.fromkeys(k for r in records for k in r if k.startswith(keys))
            keys = tuple((k, k.removeprefix(keys)) for k in names)
        drawn = []
        for i, (key, label) in enumerate(keys):
            steps, values = series(records, key)
            if len(steps):
                colour = f"C{i}"
                weight = 0.0 if key == "lr" else smoothing
                _curve(ax, steps, values, colour, label, key, weight)
                drawn.append(label)
        if not drawn:
            _no_data(ax)
        elif len(drawn) > 1:
            ax.legend(fontsize=8)
    _step_limits(axes, records)
    fig.suptitle(f"training diagnostics (lines: debiased EMA, weight {smoothing:g}; lr raw)")
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_reward_curve(records: Sequence[dict], path: str | Path, smoothing: float = 0.6) -> Path:
    """``reward_curve.png``: :func:`reward_figure` of ``records`` saved at ``path``."""
    return save(reward_figure(records, smoothing), path)


def write_training_curves(
    records: Sequence[dict], path: str | Path, smoothing: float = 0.6
) -> Path:
    """``training_curves.png``: :func:`training_figure` of ``records`` saved at ``path``."""
    return save(training_figure(records, smoothing), path)
