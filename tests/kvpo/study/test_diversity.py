"""Branch diversity on constructed groups with known answers (world renders)."""

import math

import pytest
import torch

from kvpo.study.diversity import attribute_spread, attributes, latent_l2, pixel_difference
from kvpo.toy.prompts import Segment
from kvpo.toy.world import generate_video

SEGMENT = Segment("red", "circle", "right")


def _video(segment=SEGMENT, seed=4):
    return generate_video([segment], [9], seed=seed).frames  # [9, 3, 32, 32]


def test_identical_branches_have_zero_diversity():
    group = _video().expand(4, -1, -1, -1, -1)
    assert latent_l2(2 * group - 1) == 0.0
    assert pixel_difference(group) == 0.0
    assert attribute_spread(attributes(group)) == {
        "presence": 0.0,
        "colour": 0.0,
        "shape": 0.0,
        "position": 0.0,
        "velocity": 0.0,
    }


def test_distances_equal_plain_pairwise_means():
    torch.manual_seed(1)
    x = torch.rand(3, 2, 3, 4, 4, dtype=torch.float64)
    pairs = [(0, 1), (0, 2), (1, 2)]
    rms = sum(math.sqrt(float(((x[i] - x[j]) ** 2).mean())) for i, j in pairs) / 3
    mad = sum(float((x[i] - x[j]).abs().mean()) for i, j in pairs) / 3
    assert latent_l2(x) == pytest.approx(rms, rel=1e-12)
    assert pixel_difference(x) == pytest.approx(mad, rel=1e-12)


def test_recoloured_branch_disagrees_on_colour_only():
    red, blue = _video(), _video(Segment("blue", "circle", "right"))
    spread = attribute_spread(attributes(torch.stack([red, blue])))
    want = {"presence": 0.0, "colour": 1.0, "shape": 0.0, "position": 0.0, "velocity": 0.0}
    assert spread == want


def test_reshaped_branch_disagrees_on_shape():
    circle, square = _video(), _video(Segment("red", "square", "right"))
    spread = attribute_spread(attributes(torch.stack([circle, square])))
    assert spread["shape"] == 1.0 and spread["colour"] == 0.0


def test_shifted_branch_moves_by_the_shift():
    video = _video()
    shifted = torch.zeros_like(video)
    shifted[..., 3:, :] = video[..., :-3, :]  # 3 px down: the object stays inside the frame
    spread = attribute_spread(attributes(torch.stack([video, shifted])))
    assert spread["position"] == pytest.approx(3.0, abs=1e-5)
    assert spread["velocity"] == pytest.approx(0.0, abs=1e-5)
    assert spread["presence"] == 0.0


def test_reversed_branch_differs_in_velocity_and_an_empty_one_in_presence():
    video = _video()
    backwards = video.flip(0)  # the same path, run the other way
    empty = torch.zeros_like(video)
    attrs = attributes(torch.stack([video, backwards, empty]))
    speed = float((attrs.velocity[0, 1:]).norm(dim=-1).mean())
    spread = attribute_spread(attrs)
    # pairs (0, 1), (0, 2), (1, 2): presence differs in the 2 pairs with the empty branch
    assert spread["presence"] == pytest.approx(2 / 3)
    # velocities are opposite in the only pair where both are present: |v - (-v)| = 2 |v|
    assert spread["velocity"] == pytest.approx(2 * speed, rel=0.05)
