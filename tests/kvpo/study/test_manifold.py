"""On-manifold scores of toy frames: world renders score fully; planted artefacts lower them.

Hand oracles: a render whose centre and radius lie on the search's coarse grid is found exactly,
so a uniform recolouring, a second object or a stray pixel cost exactly the changed pixels'
squared error over ``3 H W`` values.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kvpo.study.manifold import manifold_scores, valid_scene
from kvpo.toy.prompts import COLOURS, Segment
from kvpo.toy.world import WorldConfig, generate_video, sample_batch, shape_mask

WORLD = WorldConfig()
VALUES = 3 * 32 * 32


def _render(shape="circle", colour="red", centre=(16.0, 16.0), radius=5.5):
    """One frame [3, 32, 32]: a world render at a grid point of the coarse search."""
    mask = shape_mask(shape, torch.tensor([centre]), radius, 32, 32)[0]
    return mask.float() * torch.tensor(COLOURS[colour]).view(3, 1, 1), mask


def test_world_videos_are_valid_scenes_at_distance_zero():
    frames, _, _ = sample_batch(8, 8, seed=3)  # 8 videos x 24 frames
    scores = manifold_scores(frames.flatten(0, 1))
    assert bool(scores.valid.all())
    # the search is exact where its finest grid reaches the render, else a few rim pixels off
    assert float((scores.distance == 0).float().mean()) >= 0.9
    assert float(scores.distance.mean()) <= 0.003
    assert float(scores.distance.max()) <= math.sqrt(8 / VALUES)  # at most 8 channel values


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_grid_render_is_found_exactly(shape):
    frame, _ = _render(shape, "cyan", (12.0, 20.0), 5.5)
    scores = manifold_scores(frame[None])
    assert float(scores.distance[0]) == 0.0 and bool(scores.valid[0])


def test_off_palette_colour_costs_its_distance_to_the_nearest_palette_colour():
    _, mask = _render()
    colour = torch.tensor([0.8, 0.2, 0.1])  # nearest palette colour: red, at squared 0.09
    frame = mask.float() * colour.view(3, 1, 1)
    scores = manifold_scores(frame[None])
    area = int(mask.sum())
    assert float(scores.distance[0]) == pytest.approx(math.sqrt(0.09 * area / VALUES), rel=1e-5)
    assert not bool(scores.palette[0]) and not bool(scores.valid[0])
    assert bool(scores.one_object[0]) and bool(scores.clean_background[0])


def test_second_object_costs_its_pixels():
    frame, _ = _render()
    frame[1, 1:4, 27:30] = 1.0  # a 3x3 green square in a corner: 9 values of 1
    scores = manifold_scores(frame[None])
    assert float(scores.distance[0]) == pytest.approx(math.sqrt(9 / VALUES), rel=1e-5)
    assert not bool(scores.one_object[0]) and not bool(scores.valid[0])


def test_blurred_frame_leaves_the_manifold():
    frame, _ = _render("square", "blue")
    blurred = F.avg_pool2d(frame[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    scores = manifold_scores(torch.stack([frame, blurred]))
    assert bool(scores.valid[0]) and not bool(scores.valid[1])
    assert not bool(scores.clean_background[1])  # its rim: values between 0.1 and 0.5
    assert float(scores.distance[1]) > 0.05 > float(scores.distance[0]) == 0.0


def test_background_tolerance_is_a_tenth_of_full_scale():
    frame, _ = _render()
    dim, bright = frame.clone(), frame.clone()
    dim[:, 2, 2] = 0.09
    bright[:, 2, 2] = 0.11
    scores = valid_scene(torch.stack([frame, dim, bright]))
    assert scores.valid.tolist() == [True, True, False]
    assert scores.clean_background.tolist() == [True, True, False]


def test_empty_frame_is_not_a_scene():
    scores = manifold_scores(torch.zeros(1, 3, 32, 32))
    assert not bool(scores.valid[0]) and not bool(scores.one_object[0])
    # the nearest render is the smallest object: a triangle of radius 5 in its darkest colour
    assert float(scores.distance[0]) > 0


def test_multi_segment_video_changes_colour_and_stays_valid():
    segs = [Segment("red", "triangle", "left"), Segment("blue", "triangle", "up")]
    video = generate_video(segs, [6, 6], seed=5, config=WORLD)
    scores = manifold_scores(video.frames)
    assert bool(scores.valid.all()) and float(scores.distance.max()) <= math.sqrt(8 / VALUES)
