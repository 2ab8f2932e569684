"""Advantages against hand computations and a plain-Python (statistics module) oracle."""

import math
import statistics

import pytest
import torch

from kvpo.method.advantages import (
    AdvantageConfig,
    anchor_advantage,
    any_branch_beats_anchor,
    group_advantages,
    group_mean_advantage,
    normalize_for_fusion,
)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_anchor_advantage_by_hand():
    # r = [1, 2, 3], anchor 2: std of [1, 2, 3, 2] (unbiased) = sqrt(2/3)
    adv = anchor_advantage(t([1.0, 2.0, 3.0]), t(2.0))
    s = math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([-1 / s, 0.0, 1 / s], rel=1e-6)


def test_group_mean_by_hand():
    # r = [0, 0, 3]: mean 1, unbiased std sqrt(3)
    adv = group_mean_advantage(t([0.0, 0.0, 3.0]))
    s = math.sqrt(3)
    assert adv.tolist() == pytest.approx([-1 / s, -1 / s, 2 / s], rel=1e-6)


def test_constant_rewards_give_zero_not_nan():
    assert anchor_advantage(t([0.5] * 4), t(0.5)).tolist() == [0.0] * 4
    assert group_mean_advantage(t([0.5] * 4)).tolist() == [0.0] * 4
    assert normalize_for_fusion(t([0.0] * 4)).tolist() == [0.0] * 4


def oracle(local, global_, weights, lw=1.0, gw=0.5, clip=2.5):
    """The whole rule in plain Python floats."""

    def signal(rewards, anchor):
        total = [0.0] * len(next(iter(rewards.values())))
        for k, w in weights.items():
            sd = statistics.stdev(rewards[k] + [anchor[k]]) + 1e-8
            for i, r in enumerate(rewards[k]):
                total[i] += w * (r - anchor[k]) / sd
        sd = statistics.pstdev(total)
        return [x / (sd + 1e-8) for x in total] if sd > 1e-8 else total

    loc, glo = signal(*local), signal(*global_)
    return [max(-clip, min(clip, lw * a + gw * b)) for a, b in zip(loc, glo)]


def test_fused_against_python_oracle():
    gen = torch.Generator().manual_seed(0)
    weights = {"ta": 1.0, "mq": 0.3, "vq": 0.5}
    for _ in range(20):
        G = int(torch.randint(2, 9, (1,), generator=gen))

        def draw(G=G):
            rewards = {k: torch.rand(G, generator=gen).tolist() for k in weights}
            anchor = {k: float(torch.rand((), generator=gen)) for k in weights}
            return rewards, anchor

        local, global_ = draw(), draw()
        expected = oracle(local, global_, weights)

        def as_tensors(signal):
            return {k: t(v) for k, v in signal[0].items()}, {k: t(v) for k, v in signal[1].items()}

        out = group_advantages(as_tensors(local), as_tensors(global_), weights)
        assert out.final.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert set(out.components) == {f"{s}/{k}" for s in ("local", "global") for k in weights}


def test_clip_and_weights_by_hand():
    # one component, G = 2, anchor in the middle: local adv = +-0.5/std([0, 1, .5]) = +-1
    # population std of [-1, 1] is 1 -> normalised [-1, 1]; global the same, reversed.
    loc = ({"r": t([0.0, 1.0])}, {"r": t(0.5)})
    glo = ({"r": t([1.0, 0.0])}, {"r": t(0.5)})
    out = group_advantages(
        loc, glo, {"r": 1.0}, AdvantageConfig(local_weight=1.0, global_weight=0.5)
    )
    assert out.local.tolist() == pytest.approx([-1.0, 1.0], rel=1e-6)
    assert out.final.tolist() == pytest.approx([-0.5, 0.5], rel=1e-6)
    big = group_advantages(
        loc, glo, {"r": 1.0}, AdvantageConfig(local_weight=4.0, global_weight=0.0, clip=2.5)
    )
    assert big.fused.tolist() == pytest.approx([-4.0, 4.0], rel=1e-6)
    assert big.final.tolist() == [-2.5, 2.5] and big.clip_fraction == 1.0


def test_local_only_and_grpo_mode():
    loc = ({"r": t([0.0, 1.0, 2.0])}, {"r": t(100.0)})
    out = group_advantages(loc, None, {"r": 1.0}, AdvantageConfig(mode="grpo"))
    # grpo ignores the anchor: [-1, 0, 1] / 1 -> pstd sqrt(2/3)
    s = math.sqrt(2 / 3)
    assert out.final.tolist() == pytest.approx([-1 / s, 0.0, 1 / s], rel=1e-6)
    with pytest.raises(ValueError, match="neither"):
        group_advantages(None, None, {"r": 1.0})


def test_reward_gate():
    weights = {"a": 1.0, "b": 1.0}
    worse = ({"a": t([0.1, 0.2]), "b": t([0.1, 0.1])}, {"a": t(0.3), "b": t(0.1)})
    better = ({"a": t([0.1, 0.4]), "b": t([0.1, 0.1])}, {"a": t(0.3), "b": t(0.1)})
    assert not any_branch_beats_anchor([worse, None], weights)
    assert any_branch_beats_anchor([worse, better], weights)


def test_raw_weighted_advantage_is_theirs():
    """use_raw_weighted_reward_advantage (their _rollout, ~1520): each signal's advantage is
    _anchor_advantage(weighted raw aggregate, the anchor's aggregate), before fusion."""

    def their_signal(rewards, anchor, weights):
        branch = [sum(weights[k] * rewards[k][i] for k in weights) for i in range(3)]
        aggregate = sum(weights[k] * anchor[k] for k in weights)
        sd = statistics.stdev(branch + [aggregate]) + 1e-8
        return [(r - aggregate) / sd for r in branch]

    gen = torch.Generator().manual_seed(4)
    weights = {"hps": 1.0, "motion": 0.3}
    signals = []
    for _ in range(2):
        rewards = {k: torch.rand(3, generator=gen).tolist() for k in weights}
        anchor = {k: float(torch.rand((), generator=gen)) for k in weights}
        signals.append((rewards, anchor))
    as_tensors = [
        ({k: t(v) for k, v in r.items()}, {k: t(v) for k, v in a.items()}) for r, a in signals
    ]
    config = AdvantageConfig(raw_weighted=True, clip=0.0, fusion_mode="none")
    out = group_advantages(*as_tensors, weights, config)
    expected = [their_signal(*s, weights) for s in signals]
    assert out.local.tolist() == pytest.approx(expected[0], rel=1e-5)
    assert out.global_.tolist() == pytest.approx(expected[1], rel=1e-5)
    fused = [a + 0.5 * b for a, b in zip(*expected)]
    assert out.final.tolist() == pytest.approx(fused, rel=1e-5)
    # it differs from the default (the weighted sum of per-component advantages)
    default = group_advantages(*as_tensors, weights, AdvantageConfig(clip=0.0, fusion_mode="none"))
    assert not torch.allclose(default.local, out.local, rtol=1e-3)
    assert set(out.components) == set(default.components)  # components still reported
    grpo = group_advantages(
        as_tensors[0], None, weights, AdvantageConfig(mode="grpo", raw_weighted=True)
    )
    aggregate = sum(w * torch.tensor(signals[0][0][k]) for k, w in weights.items())
    plain = (aggregate - aggregate.mean()) / (aggregate.std() + 1e-8)
    assert grpo.local.tolist() == pytest.approx(plain.tolist(), rel=1e-5)
