"""Motion rewards: the formulas on hand-made flow fields (values worked out here), and the RAFT
flow wrapper with random weights (shapes, dtype, frame pairing, batch invariance)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvpo.rewards.motion import (
    DynamicDegreeReward,
    FlowField,
    MotionSmoothnessReward,
    dynamic_degree_terms,
    smoothness_terms,
)
from kvpo.rewards.raft import RAFT
from kvpo.rewards.registry import resolve_reward, score

EPS = 1e-6


def field(pairs, h, w, fn):
    """``flows [1, pairs, 2, h, w]`` with ``flows[0, p, :, y, x] = fn(p, y, x)``."""
    out = torch.zeros(1, pairs, 2, h, w)
    for p in range(pairs):
        for y in range(h):
            for x in range(w):
                out[0, p, :, y, x] = torch.tensor(fn(p, y, x), dtype=torch.float32)
    return out


def loop_smoothness(flow):
    """The smoothness formula of one video ``[P, 2, H, W]`` with plain loops (float64)."""
    f = flow.double().tolist()
    pairs, h, w = len(f), len(f[0][0]), len(f[0][0][0])

    def vec(p, y, x):
        return f[p][0][y][x], f[p][1][y][x]

    def norm(a, b):
        return math.sqrt((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 + EPS)

    def moving(p, y, x):
        return norm(vec(p, y, x), (0.0, 0.0)) > 0.02

    def mean(values):
        return sum(values) / max(len(values), EPS)

    right = [norm(vec(p, y, x + 1), vec(p, y, x)) for p in range(pairs) for y in range(h)
             for x in range(w - 1) if moving(p, y, x) and moving(p, y, x + 1)]  # fmt: skip
    below = [norm(vec(p, y + 1, x), vec(p, y, x)) for p in range(pairs) for y in range(h - 1)
             for x in range(w) if moving(p, y, x) and moving(p, y + 1, x)]  # fmt: skip
    later = [norm(vec(p + 1, y, x), vec(p, y, x)) for p in range(pairs - 1) for y in range(h)
             for x in range(w) if moving(p, y, x) and moving(p + 1, y, x)]  # fmt: skip
    spatial = 0.5 * (mean(right) + mean(below))
    temporal = mean(later) if pairs >= 2 else 0.0
    return math.exp(-8 * (0.6 * spatial + 0.4 * temporal)), spatial, temporal


def test_smoothness_of_zero_flow_translation_and_jitter():
    zero = smoothness_terms(torch.zeros(1, 3, 2, 6, 7))
    assert zero["motion_smoothness"].tolist() == [1.0]  # nothing moves: no jitter to count
    assert zero["motion_ratio"].tolist() == [0.0]

    # a uniform translation: every difference is 0, its norm sqrt(eps) = 1e-3
    shift = smoothness_terms(field(3, 6, 7, lambda p, y, x: (3.0, -2.0)))
    assert shift["motion_spatial_jitter"].item() == pytest.approx(1e-3, rel=1e-4)
    assert shift["motion_temporal_jitter"].item() == pytest.approx(1e-3, rel=1e-4)
    assert shift["motion_smoothness"].item() == pytest.approx(math.exp(-8e-3), rel=1e-6)
    assert shift["motion_ratio"].tolist() == [1.0]

    # spatial jitter: x-flow alternating +1 / -1 by column, the same in both pairs
    comb = smoothness_terms(field(2, 5, 6, lambda p, y, x: (1.0 if x % 2 else -1.0, 0.0)))
    spatial = 0.5 * (math.sqrt(4 + EPS) + math.sqrt(EPS))
    assert comb["motion_spatial_jitter"].item() == pytest.approx(spatial, rel=1e-6)
    assert comb["motion_temporal_jitter"].item() == pytest.approx(1e-3, rel=1e-4)

    # temporal jitter: the whole field flips from (1, 0) to (-1, 0) and back
    flip = smoothness_terms(field(3, 4, 4, lambda p, y, x: (1.0 if p % 2 == 0 else -1.0, 0.0)))
    assert flip["motion_temporal_jitter"].item() == pytest.approx(math.sqrt(4 + EPS), rel=1e-6)
    expected = math.exp(-8 * (0.6 * 1e-3 + 0.4 * math.sqrt(4 + EPS)))
    assert flip["motion_smoothness"].item() == pytest.approx(expected, rel=1e-5)


def test_smoothness_masks_still_pixels_like_a_plain_loop():
    torch.manual_seed(3)
    flows = torch.randn(3, 3, 2, 5, 6)
    flows[flows.abs() < 0.6] = 0.0  # many still pixels, some with one zero component
    flows[1, :, :, :, :3] = 0.0
    out = smoothness_terms(flows)
    for b in range(3):
        reward, spatial, temporal = loop_smoothness(flows[b])
        assert out["motion_spatial_jitter"][b].item() == pytest.approx(spatial, rel=1e-5)
        assert out["motion_temporal_jitter"][b].item() == pytest.approx(temporal, rel=1e-5)
        assert out["motion_smoothness"][b].item() == pytest.approx(reward, rel=1e-5)
    single = smoothness_terms(flows[:, :1])  # one pair: no temporal term
    assert single["motion_temporal_jitter"].tolist() == [0.0, 0.0, 0.0]
    assert all(v.tolist() == [0.0] for v in smoothness_terms(torch.zeros(1, 0, 2, 4, 4)).values())


def magnitude_reward(v):
    return math.exp(-((v - 0.6) ** 2) / 0.08) * (1 - 0.5 * math.exp(-3 * v))


def test_dynamic_degree_of_zero_flow_target_motion_and_saturation():
    h = w = 10
    unit = 0.15 * math.sqrt(h * h + w * w)  # the flow length that normalises to 1
    still = dynamic_degree_terms(torch.zeros(1, 3, 2, h, w))
    assert still["dynamic_magnitude"].item() == pytest.approx(0.5 * math.exp(-4.5), rel=1e-5)
    assert still["dynamic_steadiness"].tolist() == [1.0]
    assert still["dynamic_degree"].item() == pytest.approx(1.5 * 0.5 * math.exp(-4.5) + 1, rel=1e-6)

    # a translation of exactly 0.6 units, at 45 degrees: the target magnitude
    s = 0.6 * unit / math.sqrt(2)
    target = dynamic_degree_terms(field(2, h, w, lambda p, y, x: (s, -s)))
    assert target["dynamic_normalized_magnitude"].item() == pytest.approx(0.6, rel=1e-6)
    assert target["dynamic_magnitude"].item() == pytest.approx(magnitude_reward(0.6), rel=1e-5)

    # far past one unit: clipped to 1
    fast = dynamic_degree_terms(field(2, h, w, lambda p, y, x: (5 * unit, 0.0)))
    assert fast["dynamic_normalized_magnitude"].tolist() == [1.0]
    assert fast["dynamic_magnitude"].item() == pytest.approx(magnitude_reward(1.0), rel=1e-5)


def test_dynamic_degree_top_five_percent_and_flicker():
    h = w = 10  # k = max(1, int(100 * 5 / 100)) = 5 pixels per pair
    unit = 0.15 * math.sqrt(200)
    speeds = {(0, 0): 0.9, (0, 1): 0.9, (0, 2): 0.9}  # three fast pixels, the rest 0.5 units

    def fn(p, y, x):
        return (speeds.get((y, x), 0.5) * unit if p == 0 else 0.2 * unit, 0.0)

    out = dynamic_degree_terms(field(3, h, w, lambda p, y, x: fn(p % 2, y, x)))
    top = [(3 * 0.9 + 2 * 0.5) / 5, 0.2, (3 * 0.9 + 2 * 0.5) / 5]
    v = sum(top) / 3
    assert out["dynamic_normalized_magnitude"].item() == pytest.approx(v, rel=1e-5)
    level = (3 * 0.9 + 97 * 0.5) / 100  # mean over pixels of pair 0 and 2
    steady = math.exp(-abs(level - 0.2) / 0.1)
    assert out["dynamic_steadiness"].item() == pytest.approx(steady, rel=1e-5)
    assert out["dynamic_degree"].item() == pytest.approx(1.5 * magnitude_reward(v) + steady, 1e-5)
    assert dynamic_degree_terms(torch.zeros(2, 1, 2, 4, 4))["dynamic_steadiness"].tolist() == [1, 1]


@pytest.fixture(scope="module")
def raft_small():
    torch.manual_seed(0)
    return RAFT("small", num_flow_updates=1).eval()


def test_flow_field_pairs_consecutive_frames(raft_small):
    torch.manual_seed(1)
    videos = torch.rand(2, 3, 3, 20, 12)
    flows = FlowField(raft_small, batch_size=3)(videos)
    assert flows.shape == (2, 2, 2, 20, 12) and flows.dtype == torch.float32
    assert FlowField.padding(20, 12) == (58, 58, 54, 54)  # to 128 x 128, centred
    assert FlowField.padding(130, 200) == (0, 0, 3, 3)  # to 136 x 200
    pad = (58, 58, 54, 54)
    firsts = [videos[b, p] for b in range(2) for p in range(2)]  # row b * 2 + p
    seconds = [videos[b, p + 1] for b in range(2) for p in range(2)]
    with torch.no_grad():
        direct, back = (
            raft_small(F.pad(torch.stack(a) * 2 - 1, pad, "replicate"),
                       F.pad(torch.stack(c) * 2 - 1, pad, "replicate"))[..., 54:74, 58:70]
            for a, c in ((firsts, seconds), (seconds, firsts))
        )  # fmt: skip
    torch.testing.assert_close(flows.reshape(4, 2, 20, 12), direct, rtol=1e-4, atol=1e-3)
    assert (back - direct).abs().max() > 1e-2  # the order matters: frame p to p + 1, not back
    assert FlowField(raft_small)(videos[:, :1]).shape == (2, 0, 2, 20, 12)


def test_flow_field_is_batch_invariant(raft_small):
    torch.manual_seed(2)
    videos = torch.rand(3, 3, 3, 16, 16)
    whole = FlowField(raft_small, batch_size=0)(videos)
    one = FlowField(raft_small, batch_size=1)(videos)
    alone = torch.cat([FlowField(raft_small)(videos[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(one, whole, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(alone, whole, rtol=1e-4, atol=1e-3)


def test_rewards_equal_the_formulas_of_their_flows(raft_small, tmp_path):
    torch.manual_seed(4)
    videos = torch.rand(2, 3, 3, 16, 16)
    flows = FlowField(raft_small)(videos)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small.state_dict(), path)
    smooth = resolve_reward("motion_smoothness", path=str(path), num_flow_updates=1)
    assert isinstance(smooth, MotionSmoothnessReward) and smooth.flow.model.arch == "small"
    out = score(smooth, videos, ["a", "b"])
    for name, value in smoothness_terms(flows).items():
        torch.testing.assert_close(out[name], value, rtol=1e-4, atol=1e-5)
    dynamic = DynamicDegreeReward(model=raft_small, offload=True)
    out = score(dynamic, videos, ["a", "b"])
    for name, value in dynamic_degree_terms(flows).items():
        torch.testing.assert_close(out[name], value, rtol=1e-4, atol=1e-5)
    assert dynamic.placement.device.type == "cpu"
    with pytest.raises(ValueError, match="needs path= the RAFT weights file"):
        resolve_reward("dynamic_degree")


@pytest.mark.gpu
def test_offload_round_trip_keeps_the_scores(raft_small):
    videos = torch.rand(2, 3, 3, 16, 16)
    reward = MotionSmoothnessReward(model=RAFT("small", 1).eval(), offload=True)
    reward.placement.module.load_state_dict(raft_small.state_dict())
    on_cpu = reward(videos, ["a", "b"])
    on_gpu = reward(videos.cuda(), ["a", "b"])
    assert reward.placement.device.type == "cpu"  # back on the CPU after scoring
    for name in reward.names:
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-3, atol=1e-4)
