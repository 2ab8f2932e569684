"""reward_curve.png and training_curves.png of kvpo.outputs.plots from synthetic records."""

import numpy as np
import pytest
from matplotlib.ticker import MaxNLocator
from PIL import Image

from kvpo.outputs.plots import (
    reward_figure,
    series,
    smooth,
    training_figure,
    write_reward_curve,
    write_training_curves,
)

SKIPPED = 4
EVAL_STEPS = (4, 9)


def ema_closed_form(y, w):
    """s_i = sum_j w^(i-j) (1-w) y_j / (1 - w^(i+1)): the debiased EMA without its recursion."""
    y = np.asarray(y, dtype=float)
    out = []
    for i in range(len(y)):
        weights = (1 - w) * w ** np.arange(i, -1, -1)
        out.append((weights * y[: i + 1]).sum() / (1 - w ** (i + 1)))
    return np.array(out)


def branches(step, comp):
    """Four branch rewards of a component at a step."""
    base = {"a": 0.3, "b": 0.6}[comp] + 0.02 * step
    return [base + 0.05 * k * (-1) ** (step + k) for k in range(4)]


def anchor(step, comp):
    return {"a": 0.25, "b": 0.55}[comp] + 0.01 * step + 0.03 * (step % 3)


def make_records(steps=range(10)):
    records = []
    for s in steps:
        if s == SKIPPED:
            records.append({"step": s, "time": 1.0, "skipped": "non-finite reward"})
        else:
            rec = {"step": s, "time": 1.0, "loss": 1.0 / (s + 1), "grad_norm": 0.1 * s}
            rec.update({"policy/approx_kl": 0.01 * s, "policy/kl_ref": 0.02 * s})
            rec.update({"policy/clip_fraction": 0.125 * (s % 3), "lr": 1e-4 * min(1, (s + 1) / 5)})
            rec.update({"time/rollout": 2.0 + s, "time/update": 0.5})
            for comp in "ab":
                rec[f"reward_local/{comp}/branches"] = branches(s, comp)
                rec[f"reward_local/{comp}/anchor"] = anchor(s, comp)
            rec["reward_local/total/branches"] = list(np.add(branches(s, "a"), branches(s, "b")))
            rec["reward_local/total/anchor"] = sum(anchor(s, c) for c in "ab")
            records.append(rec)
        if s in EVAL_STEPS:
            records.append(
                {"step": s, "time": 2.0, "eval/a": 0.1 * s, "eval/b": 0.2, "eval/total": 9}
            )
    return records


def line(fig, gid):
    found = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, f"{len(found)} lines with gid {gid}"
    return found[0]


def test_smooth_is_the_debiased_ema():
    y = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    for w in (0.0, 0.6, 0.9):
        assert np.allclose(smooth(y, w), ema_closed_form(y, w))
    assert np.allclose(smooth([2.0] * 5, 0.8), 2.0)
    with pytest.raises(ValueError):
        smooth(y, 1.0)


def test_series_skips_missing_and_keeps_the_last_value_of_a_repeated_step():
    records = [{"step": 0, "x": [1, 3]}, {"step": 1}, {"step": 2, "x": float("nan")}]
    records += [{"step": 3, "x": 5}, {"step": 3, "x": 7}, {"step": 1.0, "y": 1}]
    steps, values = series(records, "x")
    assert steps.tolist() == [0, 3] and values.tolist() == [2.0, 7.0]
    assert series(records, "x", max)[1].tolist() == [3.0, 7.0]


def test_reward_figure_data(tmp_path):
    records = make_records()
    fig = reward_figure(records, smoothing=0.6)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["local: a", "local: b", "local: total", "eval: a", "eval: b", "eval: total"]
    kept = [s for s in range(10) if s != SKIPPED]
    for comp in "ab":
        raw_mean = [np.mean(branches(s, comp)) for s in kept]
        smoothed = line(fig, f"local/{comp}/branches/smoothed")
        assert smoothed.get_xdata().tolist() == kept
        assert np.allclose(smoothed.get_ydata(), ema_closed_form(raw_mean, 0.6))
        assert np.allclose(line(fig, f"local/{comp}/branches/raw").get_ydata(), raw_mean)
        anchors = [anchor(s, comp) for s in kept]
        assert np.allclose(
            line(fig, f"local/{comp}/anchor/smoothed").get_ydata(), ema_closed_form(anchors, 0.6)
        )
        ev = line(fig, f"eval/{comp}")
        assert ev.get_xdata().tolist() == list(EVAL_STEPS)
        assert np.allclose(ev.get_ydata(), [0.1 * 4, 0.1 * 9] if comp == "a" else [0.2, 0.2])
    totals = [sum(np.mean(branches(s, c)) for c in "ab") for s in kept]
    assert np.allclose(
        line(fig, "local/total/branches/smoothed").get_ydata(), ema_closed_form(totals, 0.6)
    )
    band = fig.axes[0].collections[0].get_paths()[0].vertices  # fill_between: min to max
    lows = [min(branches(s, "a")) for s in kept]
    highs = [max(branches(s, "a")) for s in kept]
    corners = {(round(x, 9), round(y, 9)) for x, y in band}
    expected = {(s, round(v, 9)) for s, lo, hi in zip(kept, lows, highs) for v in (lo, hi)}
    assert corners == expected
    skipped = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "skipped step"]
    assert len(skipped) == 1 and list(skipped[0].get_xdata()) == [SKIPPED, SKIPPED]
    fig.canvas.draw()
    for ax in fig.axes:
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks))
    path = write_reward_curve(records, tmp_path / "run" / "reward_curve.png")
    assert Image.open(path).size == (3 * 360, 2 * 270)


def test_reward_figure_without_eval_and_with_both_signals():
    records = make_records(range(3))
    for r in records:
        for k in [k for k in r if k.startswith("reward_local/")]:
            r[k.replace("local", "global")] = r[k]
    records = [r for r in records if not any(k.startswith("eval/") for k in r)]
    titles = [ax.get_title() for ax in reward_figure(records).axes]
    assert titles == [f"{sig}: {c}" for sig in ("local", "global") for c in ("a", "b", "total")]


def test_single_step_and_no_data(tmp_path):
    one = make_records([0])
    fig = reward_figure(one, smoothing=0.9)
    assert line(fig, "local/a/anchor/smoothed").get_ydata().tolist() == [anchor(0, "a")]
    fig.canvas.draw()  # one step: a plain locator would tick -0.04, -0.02, 0, ...
    ticks = np.concatenate([ax.get_xticks() for ax in fig.axes])
    assert 0 in ticks and np.array_equal(ticks, np.round(ticks))
    for records in ([], [{"step": 0, "skipped": "non-finite loss"}]):
        fig = reward_figure(records)
        assert len(fig.axes) == 1 and fig.axes[0].texts[0].get_text() == "no data"
        assert write_reward_curve(records, tmp_path / "r.png").stat().st_size > 0
    write_training_curves([], tmp_path / "t.png")
    assert Image.open(tmp_path / "t.png").size == (3 * 440, 2 * 300)


def test_training_figure_data(tmp_path):
    records = make_records()
    for r in records:
        r.pop("lr", None)
    fig = training_figure(records, smoothing=0.5)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["loss", "KL", "clip fraction"] and titles[4] == "learning rate"
    kept = [s for s in range(10) if s != SKIPPED]
    loss = line(fig, "loss/smoothed")
    assert loss.get_xdata().tolist() == kept
    assert np.allclose(loss.get_ydata(), ema_closed_form([1 / (s + 1) for s in kept], 0.5))
    kl = line(fig, "policy/kl_ref/smoothed")
    assert np.allclose(kl.get_ydata(), ema_closed_form([0.02 * s for s in kept], 0.5))
    clip_panel = fig.axes[2]
    assert [
        ln.get_label() for ln in clip_panel.get_lines() if not ln.get_label().startswith("_")
    ] == ["ratio outside clip"]  # no advantage/clip_fraction in these records
    assert [t.get_text() for t in fig.axes[4].texts] == ["no data"]  # lr removed
    rollout = line(fig, "time/rollout/smoothed")
    assert np.allclose(rollout.get_ydata(), ema_closed_form([2.0 + s for s in kept], 0.5))
    path = write_training_curves(make_records(), tmp_path / "training_curves.png")
    lr = line(training_figure(make_records()), "lr/smoothed")  # the lr is drawn unsmoothed
    assert np.allclose(lr.get_ydata(), [1e-4 * min(1, (s + 1) / 5) for s in kept])
    assert Image.open(path).size == (3 * 440, 2 * 300)
