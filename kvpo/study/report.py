"""What ``kvpo study`` writes: the markdown table, the JSON record, plots and branch grids.

- ``study.md``: one row per measurement, one column per exploration mode, ``mean +- SE`` over
  the groups; then the attention mass per layer and, when run, the held-out gain per mode.
- ``study.json``: every group's numbers, the aggregates, the attention summaries, the settings.
- ``diversity_vs_manifold.png``: per mode, each group's branch diversity (pixel difference, and
  the object's position spread) against how much further from the manifold its branches are
  than its anchor (render distance, and the toy's visual quality; real models: the weighted
  reward), the mode's mean with its SE.
- ``attention_mass.png``: per mode and layer, the mass the branches and the anchor put on the
  sink, the middle (routed / replaced) frames, the nearest frames and the block itself.
- ``branches_<mode>.png``: the first pair's group from the fork on (:func:`branch_grid`).

Plots use matplotlib's object API on an Agg canvas (as :mod:`kvpo.outputs.plots`).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kvpo.outputs.media import branch_grid, branch_labels
from kvpo.study.attention import ROLES
from kvpo.study.groups import mean_se

COLOURS = {
    "kv_routing": "#1f77b4",
    "noise_injection": "#d62728",
    "initial_noise": "#2ca02c",
    "kv_routing+noise": "#9467bd",
}
ROLE_COLOURS = {"sink": "#7f7f7f", "middle": "#ff7f0e", "nearest": "#1f77b4", "self": "#2ca02c"}

# (key, label, scale, digits): the table's rows in order; scale 100 = percent
ROWS = (
    ("diversity/pixel", "pixel difference between branches (% of full scale)", 100, 3),
    ("diversity/pixel_to_anchor", "pixel difference branch - anchor (% of full scale)", 100, 3),
    ("diversity/latent_l2", "latent RMS difference between branches", 1, 4),
    ("diversity/latent_l2_to_anchor", "latent RMS difference branch - anchor", 1, 4),
    ("semantic/presence", "object presence differs (% of frame pairs)", 100, 2),
    ("semantic/colour", "colour differs (% of frame pairs with objects)", 100, 2),
    ("semantic/shape", "shape differs (% of frame pairs with objects)", 100, 2),
    ("semantic/position", "position spread (px)", 1, 3),
    ("semantic/velocity", "velocity spread (px/frame)", 1, 3),
    ("routing/content_change", "routed vs replaced frames: latent RMS difference", 1, 4),
    ("anchor/object_before_fork", "anchor: frames with the object before the fork (%)", 100, 1),
    ("anchor/object_after_fork", "anchor: frames with the object after the fork (%)", 100, 1),
    ("manifold/branches/render_distance", "branches: RMS distance to nearest render", 1, 4),
    ("manifold/anchor/render_distance", "anchor: RMS distance to nearest render", 1, 4),
    ("manifold/branches_minus_anchor_distance", "branches - anchor: render distance", 1, 4),
    ("manifold/branches/valid_share", "branches: valid scenes (% of frames)", 100, 1),
    ("manifold/anchor/valid_share", "anchor: valid scenes (% of frames)", 100, 1),
    ("manifold/branches/one_object", "branches: one object (% of frames)", 100, 1),
    ("manifold/branches/palette", "branches: palette colour (% of frames)", 100, 1),
    ("manifold/branches/clean_background", "branches: clean background (% of frames)", 100, 1),
    ("signal/reward_std_local", "std of branch rewards, local (weighted total)", 1, 4),
    ("signal/reward_std_global", "std of branch rewards, global (weighted total)", 1, 4),
    ("signal/branch_minus_anchor_local", "branch mean - anchor, local (weighted total)", 1, 4),
    ("signal/branch_minus_anchor_global", "branch mean - anchor, global (weighted total)", 1, 4),
    ("signal/no_branch_beats_anchor", "groups where no branch beats the anchor (%)", 100, 1),
    ("signal/all_advantages_equal", "groups whose G advantages are all equal (%)", 100, 1),
    ("signal/advantage_abs_mean", "mean abs advantage (after fusion and clip)", 1, 3),
    ("signal/energy_mean", "TVE energy of the old policy, mean", 1, 6),
    ("signal/energy_std", "TVE energy of the old policy, std within group", 1, 6),
)


def _cell(stat: dict | None, scale: float, digits: int) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} +- {stat['se'] * scale:.{digits}f}"


def table(aggregates: dict[str, dict], extra_rows=()) -> str:
    """Markdown table: measurements x modes (``aggregates[mode][key]``)."""
    modes = list(aggregates)
    lines = ["| measurement | " + " | ".join(f"`{m}`" for m in modes) + " |"]
    lines.append("| --- |" + " ---: |" * len(modes))
    for key, label, scale, digits in (*ROWS, *extra_rows):
        if not any(key in aggregates[m] for m in modes):
            continue
        cells = [_cell(aggregates[m].get(key), scale, digits) for m in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reward_rows(aggregates: dict[str, dict]) -> list[tuple]:
    """Table rows of every reward component's branch std and branch - anchor mean."""
    keys = sorted({k for agg in aggregates.values() for k in agg if k.startswith("reward_")})
    rows = []
    for key in keys:
        signal, comp, what = key.split("/")
        text = "std over branches" if what == "branch_std" else "branch mean - anchor"
        rows.append((key, f"{comp} ({signal[7:]}): {text}", 1, 4))
    return rows


def attention_table(attention: dict[str, dict]) -> str:
    """Markdown: per mode and role, the branches' and the anchor's mass per layer."""
    lines = ["| mode | rows | " + " | ".join(ROLES) + " |", "| --- | --- |" + " --- |" * 4]
    for mode, summary in attention.items():
        for rows in ("branches", "anchor"):
            cells = [" / ".join(f"{v:.3f}" for v in summary[rows][role]) for role in ROLES]
            lines.append(f"| `{mode}` | {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=1, default=float))


def _scatter(ax, groups_by_mode, xkey, ykey, xscale, yscale):
    """One faint dot per group, the mode's mean +- SE on both axes, a line at y = 0."""
    for mode, groups in groups_by_mode.items():
        xs = [g[xkey] * xscale for g in groups if xkey in g and ykey in g]
        ys = [g[ykey] * yscale for g in groups if xkey in g and ykey in g]
        if not xs:
            continue
        colour = COLOURS.get(mode, "black")
        ax.scatter(xs, ys, s=14, alpha=0.35, color=colour, linewidths=0)
        (mx, sx), (my, sy) = mean_se(xs), mean_se(ys)
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", ms=8, color=colour, capsize=3, label=mode)
    ax.axhline(0, color="black", ls="--", lw=1, label="anchor (unperturbed)")
    ax.grid(alpha=0.3)


def diversity_plot(groups_by_mode: dict[str, list[dict]], path: Path) -> None:
    """Branch diversity against how far the branches are from the manifold, relative to their
    anchor (paired per group: 0 = as on-manifold as the unperturbed video)."""
    key = "manifold/branches_minus_anchor_distance"
    toy = any(key in g for groups in groups_by_mode.values() for g in groups)
    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    if toy:
        _scatter(left, groups_by_mode, "diversity/pixel", key, 100, 1)
        left.set_ylabel("render distance, branches - anchor\n(> 0: further from valid renders)")
        _scatter(right, groups_by_mode, "semantic/position",
                 "reward_local/visual_quality/branch_minus_anchor", 1, 1)  # fmt: skip
        right.set_xlabel("object position spread between branches (px)")
        right.set_ylabel("visual quality (local), branches - anchor")
    else:
        _scatter(left, groups_by_mode, "diversity/pixel",
                 "signal/branch_minus_anchor_local", 100, 1)  # fmt: skip
        left.set_ylabel("weighted reward (local), branches - anchor")
        _scatter(right, groups_by_mode, "diversity/latent_l2",
                 "signal/branch_minus_anchor_global", 1, 1)  # fmt: skip
        right.set_xlabel("latent RMS difference between branches")
        right.set_ylabel("weighted reward (global), branches - anchor")
    left.set_xlabel("pixel difference between branches (% of full scale)")
    left.legend(fontsize=8)
    fig.suptitle("branch diversity vs staying on the data manifold (one dot per group)")
    fig.tight_layout()
    fig.savefig(path)


def attention_plot(attention: dict[str, dict], path: Path) -> None:
    modes = list(attention)
    fig = Figure(figsize=(3.6 * len(modes), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        layers = len(attention[mode]["anchor"]["self"])
        for r, rows in enumerate(("branches", "anchor")):
            bottom = [0.0] * layers
            xs = [layer + (r - 0.5) * 0.4 for layer in range(layers)]
            for role in ROLES:
                values = attention[mode][rows][role]
                label = role if (r == 0 and ax is axes[0]) else None
                ax.bar(xs, values, 0.38, bottom=bottom, color=ROLE_COLOURS[role], label=label,
                       alpha=1.0 if rows == "branches" else 0.55, edgecolor="white")  # fmt: skip
                bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(layers), [f"L{i}\nB | A" for i in range(layers)])
        ax.set_title(mode, fontsize=10)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("attention mass (mean over heads, queries, steps)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("where the window's denoising queries attend: branches (B) and anchor (A)")
    fig.tight_layout()
    fig.savefig(path)


def write_grid(extra: dict, fork_video: int, path: Path, scale: int = 3) -> None:
    """The branch grid of a group from ``fork_video`` to the end."""
    videos = extra["videos"]
    labels = branch_labels(extra["totals"], extra["anchor_total"], extra["advantages"])
    branch_grid(videos, labels, range(fork_video, videos.shape[1]), scale=scale).save(path)
