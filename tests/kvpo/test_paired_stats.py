"""Paired before/after statistics against hand computations."""

import math

import pytest

from kvpo.training.paired_stats import format_summary, paired_stat, paired_summary


def test_paired_stat_by_hand():
    # differences 0.1, 0.3, 0.2: mean 0.2, sample std 0.1, se 0.1 / sqrt(3)
    s = paired_stat("ta", [0.5, 0.4, 0.6], [0.6, 0.7, 0.8])
    assert s.before == pytest.approx(0.5) and s.after == pytest.approx(0.7)
    assert s.diff == pytest.approx(0.2) and s.se == pytest.approx(0.1 / math.sqrt(3))
    assert s.z == pytest.approx(0.2 / (0.1 / math.sqrt(3)))


def test_pairing_matters():
    # a constant improvement has (up to rounding) zero spread whatever the spread of the pairs
    s = paired_stat("vq", [0.1, 0.5, 0.9], [0.2, 0.6, 1.0])
    assert s.se == pytest.approx(0.0, abs=1e-12) and s.z > 1e10
    with pytest.raises(ValueError, match="same positive number"):
        paired_stat("x", [1.0], [1.0, 2.0])


def test_summary_total_is_weighted():
    before = {"a": [0.0, 1.0], "b": [1.0, 1.0]}
    after = {"a": [1.0, 1.0], "b": [1.0, 0.0]}
    stats = {s.name: s for s in paired_summary(before, after, {"a": 1.0, "b": 0.5})}
    # totals: before [0.5, 1.5], after [1.5, 1.0] -> diffs [1.0, -0.5]
    assert stats["total"].diff == pytest.approx(0.25)
    assert stats["total"].se == pytest.approx(math.sqrt(((0.75**2) * 2) / 1 / 2))
    text = format_summary(list(stats.values()))
    assert "total" in text and "n = 2 paired" in text
