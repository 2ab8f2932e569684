"""Toy pixel rewards on hand-made videos whose right answer is known, and the reward interface."""

import colorsys
import random
from collections import deque

import pytest
import torch

from kvpo.rewards.registry import (
    available_rewards,
    build_reward,
    register_reward,
    score,
    weighted_sum,
)
from kvpo.toy.objects import hue_saturation, label_components

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def draw(path, colours, shape="circle", size=32, r=4.5):
    """A hand-drawn video: one shape per frame at ``path[t] = (cx, cy)`` (pixel loops)."""
    video = torch.zeros(len(path), 3, size, size)
    for t, ((cx, cy), colour) in enumerate(zip(path, colours)):
        for y in range(size):
            for x in range(size):
                dx, dy = x + 0.5 - cx, y + 0.5 - cy
                inside = (
                    dx * dx + dy * dy <= r * r if shape == "circle" else max(abs(dx), abs(dy)) <= r
                )
                if inside:
                    video[t, :, y, x] = torch.tensor(colour)
    return video


def line(start, step, n):
    return [(start[0] + step[0] * t, start[1] + step[1] * t) for t in range(n)]


@pytest.fixture(scope="module")
def reward():
    return build_reward("toy")


@pytest.fixture(scope="module")
def red_left():
    return draw(line((26.5, 16.5), (-1.0, 0.0), 20), [RED] * 20)[None]


def test_text_alignment_matches_colour_shape_and_direction(reward, red_left):
    def ta(prompt):
        return score(reward, red_left, [prompt])["text_alignment"].item()

    assert ta("a red circle moves left") == pytest.approx(1.0)
    assert ta("a blue square moves up") == pytest.approx(0.0)
    # right colour and shape, wrong direction: exactly the colour and shape thirds
    assert ta("a red circle moves up") == pytest.approx(2 / 3)
    assert ta("a red circle moves right") == pytest.approx(2 / 3)
    assert ta("a red square moves left") == pytest.approx(2 / 3)


def test_text_alignment_per_segment_after_a_switch(reward):
    path = line((24.5, 24.5), (-1.0, 0.0), 12) + line((12.5, 23.5), (0.0, -1.0), 12)
    video = draw(path, [RED] * 12 + [BLUE] * 12)[None]
    meta = {"segment_starts": [[0, 12]]}
    good = "a red circle moves left, then it turns blue and moves up"
    late = "a red circle moves left, then it moves up"  # misses the colour switch
    per_segment = reward.segment_alignment(
        video.repeat(2, 1, 1, 1, 1), [good, late], {"segment_starts": [[0, 12], [0, 12]]}
    )
    assert per_segment[0].tolist() == pytest.approx([1.0, 1.0])
    assert per_segment[1].tolist() == pytest.approx([1.0, 2 / 3])
    # without metadata the frames are split evenly between segments (here the same boundary)
    assert score(reward, video, [good])["text_alignment"].item() == pytest.approx(1.0)
    assert score(reward, video, [good], meta)["text_alignment"].item() == pytest.approx(1.0)


def test_motion_quality_known_values(reward, red_left):
    clean = score(reward, red_left, ["a red circle moves left"])["motion_quality"].item()
    assert clean == pytest.approx(1.0)  # integer steps: constant area, zero acceleration
    flicker = red_left.clone()
    flicker[:, 1::2] = 0
    assert score(reward, flicker, ["a red circle moves left"])["motion_quality"].item() == 0.0
    vanish = red_left.clone()
    vanish[:, 10:] = 0
    # presence 1/2; triples with all 3 frames present: 8 of 18; steps present: 9 of 19
    expected = 0.5 * (8 / 18 + 9 / 19) / 2
    got = score(reward, vanish, ["a red circle moves left"])["motion_quality"].item()
    assert got == pytest.approx(expected, abs=1e-6)
    split = red_left.clone()
    split[0, 10:] = torch.maximum(split[0, 10:], split[0, 10:].roll(10, dims=-2))
    got = score(reward, split, ["a red circle moves left"])["motion_quality"].item()
    assert got < 0.3
    rng = random.Random(0)
    jitter_path = [(26.5 - t + rng.choice([-3, 3]), 16.5) for t in range(20)]
    jitter = draw(jitter_path, [RED] * 20)[None]
    assert score(reward, jitter, ["a red circle moves left"])["motion_quality"].item() < 0.7


def test_visual_quality_known_values(reward, red_left):
    def vq(video):
        return score(reward, video, ["a red circle moves left"])["visual_quality"].item()

    assert vq(red_left) == 1.0
    gen = torch.Generator().manual_seed(0)
    assert vq(torch.rand(red_left.shape, generator=gen)) < 0.05
    blurred = torch.nn.functional.avg_pool2d(red_left[0], 3, stride=1, padding=1)[None]
    assert vq(blurred) < 0.7
    dirty = (red_left + 0.06 * torch.rand(red_left.shape, generator=gen)).clamp(0, 1)
    assert 0.4 < vq(dirty) < 0.9
    # an empty video draws nothing: no reward at all (no free clean-background third)
    empty = score(reward, torch.zeros_like(red_left), ["a red circle moves left"])
    assert all(value.item() == 0.0 for value in empty.values())
    # half the frames empty: VQ is the object frames' score over all frames
    half = red_left.clone()
    half[:, ::2] = 0
    assert vq(half) == pytest.approx(0.5)


def test_outputs_are_batched_fp32_and_deterministic(reward, red_left):
    videos = torch.cat([red_left, torch.zeros_like(red_left)])
    prompts = ["a red circle moves left"] * 2
    out = score(reward, videos, prompts)
    assert set(out) == set(reward.names)
    for value in out.values():
        assert value.shape == (2,) and value.dtype == torch.float32
        assert ((value >= 0) & (value <= 1)).all()
    again = score(reward, videos, prompts)
    assert all(torch.equal(out[k], again[k]) for k in out)
    alone = score(reward, red_left, prompts[:1])
    assert all(out[k][0] == alone[k][0] for k in out)


def test_interface_checks_and_registry(reward, red_left):
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        score(reward, red_left[0], ["x"])
    with pytest.raises(ValueError, match="expected 1 prompts"):
        score(reward, red_left, ["a", "b"])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        score(reward, red_left * 2 - 1, ["a red circle moves left"])
    with pytest.raises(KeyError, match="available"):
        build_reward("no-such-reward")
    assert "toy" in available_rewards()

    @register_reward("test-constant")
    class Constant:
        names = ("c",)

        def __call__(self, videos, prompts, metadata=None):
            return {"c": torch.ones(videos.shape[0], dtype=torch.float64)}

    with pytest.raises(ValueError, match="float32"):
        score(build_reward("test-constant"), red_left, ["p"])
    total = weighted_sum(
        {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 5.0])}, {"a": 2.0, "b": -1.0}
    )
    assert total.tolist() == [-1.0, -1.0]
    with pytest.raises(KeyError, match=r"\['z'\]"):
        weighted_sum({"a": torch.zeros(1)}, {"z": 1.0})


def _bfs_components(mask):
    """Oracle: 8-connected component id per pixel by breadth-first search (0 = background)."""
    h, w = len(mask), len(mask[0])
    out = [[0] * w for _ in range(h)]
    current = 0
    for y0 in range(h):
        for x0 in range(w):
            if mask[y0][x0] and not out[y0][x0]:
                current += 1
                out[y0][x0] = current
                queue = deque([(y0, x0)])
                while queue:
                    y, x = queue.popleft()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            yy, xx = y + dy, x + dx
                            if 0 <= yy < h and 0 <= xx < w and mask[yy][xx] and not out[yy][xx]:
                                out[yy][xx] = current
                                queue.append((yy, xx))
    return out


def test_components_and_hue_against_oracles():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 12, 15, generator=gen) < 0.45
    labels = label_components(masks)
    for n in range(4):
        oracle = torch.tensor(_bfs_components(masks[n].tolist()))
        assert torch.equal(labels[n] == 0, oracle == 0)
        # same partition: labels map one-to-one onto oracle ids
        pairs = {(int(a), int(b)) for a, b in zip(labels[n].flatten(), oracle.flatten()) if b}
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    rgb = torch.rand(50, 3, generator=gen)
    hue, sat = hue_saturation(rgb)
    for i in range(50):
        h, s, _ = colorsys.rgb_to_hsv(*rgb[i].tolist())
        assert hue[i].item() == pytest.approx(360 * h % 360, abs=1e-3)
        assert sat[i].item() == pytest.approx(s, abs=1e-5)
