"""The procedural world, prompts and tokenizer: determinism, geometry, grammar, split."""

import numpy as np
import pytest
import torch

from kvpo.toy.prompts import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    Segment,
    all_segments,
    heldout_prompts,
    is_held_out,
    parse_prompt,
    sample_sequence,
    story_text,
)
from kvpo.toy.text import PAD, VOCAB, ToyTextEncoder, WordTokenizer
from kvpo.toy.world import generate_video, sample_batch

STORY = "a red circle moves left, then it turns blue and moves up"


def _pixel_centroids(frames: torch.Tensor) -> np.ndarray:
    """Centroid (x, y) of non-black pixels per frame, by explicit loops (oracle)."""
    out = []
    for frame in frames.numpy():
        pts = [
            (x + 0.5, y + 0.5)
            for y in range(frame.shape[1])
            for x in range(frame.shape[2])
            if frame[:, y, x].max() > 0
        ]
        out.append(np.mean(pts, axis=0))
    return np.array(out)


def test_same_seed_same_video_and_different_seed_differs():
    segs = parse_prompt(STORY)
    a = generate_video(segs, [12, 12], seed=7)
    b = generate_video(segs, [12, 12], seed=7)
    c = generate_video(segs, [12, 12], seed=8)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.centres, b.centres)
    assert not torch.equal(a.frames, c.frames)
    fa, sa, ta = sample_batch(5, 8, seed=3)
    fb, sb, tb = sample_batch(5, 8, seed=3)
    assert torch.equal(fa, fb) and sa == sb and ta == tb
    assert not torch.equal(fa, sample_batch(5, 8, seed=4)[0])


def test_motion_colour_and_switch_follow_the_segments():
    video = generate_video(parse_prompt(STORY), [12, 12], seed=1)
    frames = video.frames
    assert frames.shape == (24, 3, 32, 32) and frames.dtype == torch.float32
    # every pixel is black or the segment's palette colour
    for t in range(24):
        colour = torch.tensor(COLOURS["red" if t < 12 else "blue"])
        pixels = frames[t].permute(1, 2, 0).reshape(-1, 3)
        on = pixels.amax(1) > 0
        assert torch.equal(pixels[on], colour.expand(int(on.sum()), 3))
        assert torch.equal(pixels[~on], torch.zeros(int((~on).sum()), 3))
    steps = np.diff(_pixel_centroids(frames), axis=0)
    left, up = steps[:11], steps[12:]
    # pixel centroids of a hard-edged shape follow the continuous path to within a pixel
    assert abs(left[:, 0].sum() + 11 * video.speed) < 1.0 and abs(left[:, 1].sum()) < 1.0
    assert abs(up[:, 1].sum() + 11 * video.speed) < 1.0 and abs(up[:, 0].sum()) < 1.0
    assert 0.6 <= video.speed <= 1.4


def test_default_lengths_stay_inside_and_long_videos_bounce():
    for seed in range(20):
        frames, _, _ = sample_batch(4, 8, seed=seed)
        # the shape never touches the border (its speed is lowered so the path fits)
        border = torch.cat(
            [frames[..., 0, :], frames[..., -1, :], frames[..., :, 0], frames[..., :, -1]], -1
        )
        assert border.max() == 0
    long = generate_video([Segment("green", "square", "right")], [120], seed=0)
    xs = _pixel_centroids(long.frames)[:, 0]
    assert long.speed == pytest.approx(0.6)
    assert (np.diff(xs) < 0).any() and (np.diff(xs) > 0).any()  # it turned back at a wall
    assert long.frames[..., :, 0].max() == 0 and long.frames[..., :, -1].max() == 0


def test_parse_and_story_round_trip_and_errors():
    segs = parse_prompt(
        "A red circle moves left, then it turns blue and moves up, then it moves down."
    )
    assert segs == [
        Segment("red", "circle", "left"),
        Segment("blue", "circle", "up"),
        Segment("blue", "circle", "down"),
    ]
    assert story_text(segs) == (
        "a red circle moves left, then it turns blue and moves up, then it moves down"
    )
    assert parse_prompt("a red circle moves left then it turns green") == [
        Segment("red", "circle", "left"),
        Segment("green", "circle", "left"),
    ]
    with pytest.raises(ValueError, match="first clause"):
        parse_prompt("it moves left")
    with pytest.raises(ValueError, match="colour must be one of"):
        parse_prompt("a purple circle moves left")
    with pytest.raises(ValueError, match="continuation clause"):
        parse_prompt("a red circle moves left, then it spins")


def test_split_is_fixed_and_covers_every_word():
    held, train = all_segments("heldout"), all_segments("train")
    assert len(held) == 12 and len(train) == 60
    assert {s.colour for s in train} == set(COLOURS)
    assert {s.shape for s in train} == set(SHAPES)
    assert {s.direction for s in train} == set(DIRECTIONS)
    assert Segment("red", "circle", "left") in held  # (0 + 0 + 0) % 6 == 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        seq = sample_sequence(rng, 3, "train")
        assert not any(is_held_out(s) for s in seq)
        assert all((a.colour, a.direction) != (b.colour, b.direction) for a, b in zip(seq, seq[1:]))
    prompts = heldout_prompts(16)
    assert prompts == heldout_prompts(16) and len(set(prompts)) == 16
    assert all(is_held_out(parse_prompt(p)[0]) and len(parse_prompt(p)) == 3 for p in prompts)


def test_tokenizer_and_text_encoder():
    ids = WordTokenizer(8)(["a red circle moves left", "the blue thing"])
    assert ids[0, :5].tolist() == [VOCAB.index(w) for w in ["a", "red", "circle", "moves", "left"]]
    assert ids[0, 5:].tolist() == [PAD] * 3
    assert ids[1, 2].item() == VOCAB.index("<unk>")
    with pytest.raises(ValueError, match="at most 8"):
        WordTokenizer(8)([STORY])
    enc = ToyTextEncoder(text_dim=16, max_len=8)
    states = enc(["a red circle moves left", "a blue square moves up"])
    assert states.shape == (2, 8, 16)
    assert torch.equal(states[:, 5:], torch.zeros(2, 3, 16))
    assert not torch.allclose(states[0, 1], states[1, 1])  # 'red' vs 'blue'


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_start_is_set_by_the_first_direction(direction):
    """First frame: near the border opposite the motion, centred on the other axis (+- 2 px)."""
    story = [Segment("red", "circle", direction), Segment("blue", "square", "up")]
    dx, dy = DIRECTIONS[direction]
    for seed in range(8):
        video = generate_video(story, [12, 12], seed=seed)
        x, y = _pixel_centroids(video.frames[:1])[0]
        near = video.radius + 1.0  # radius + margin: the closest a centre gets to a border
        for pos, d in ((x, dx), (y, dy)):
            if d > 0:
                assert near - 0.5 <= pos <= near + 2.5
            elif d < 0:
                assert 32 - near - 2.5 <= pos <= 32 - near + 0.5
            else:
                assert abs(pos - 16) <= 2.5
        assert 5.0 <= video.radius <= 6.0
