"""Prompts of the toy world: segments, their words, parsing, and the fixed train/held-out split.

A prompt *sequence* describes one video as consecutive segments. Each segment names the tracked
object's colour, its shape and its direction of motion. In words::

    "a red circle moves left, then it turns blue and moves up, then it moves down"

Segments switch at block boundaries. :func:`parse_prompt` turns such a story into a list of
:class:`Segment`; :func:`segment_text` gives each segment the self-contained sentence the model
is conditioned on ("a blue circle moves up"), which is what a streaming generator receives at a
prompt switch.

Split: a segment triple ``(colour, shape, direction)`` is *held out* when
``(colour_index + 2 * shape_index + direction_index) % 6 == 0`` (12 of the 72 triples; every
colour, shape and direction still occurs in training). A training sequence uses train triples
only; a held-out sequence starts with a held-out triple.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
"""Palette: name -> RGB in [0, 1]. Hues 0, 60, ..., 300 degrees, in this order."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
"""Direction name -> unit (dx, dy) in image coordinates (x to the right, y downwards)."""

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Segment:
    """One prompt segment: the object's colour, shape and direction of motion."""

    colour: str
    shape: str
    direction: str

    def __post_init__(self):
        for value, allowed, what in (
            (self.colour, COLOURS, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.direction, DIRECTIONS, "direction"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {sorted(allowed)}, got {value!r}")


def segment_text(segment: Segment) -> str:
    """The self-contained sentence of one segment: ``"a red circle moves left"``."""
    return f"a {segment.colour} {segment.shape} moves {segment.direction}"


def story_text(segments: list[Segment]) -> str:
    """The whole sequence in words, continuation clauses joined by ``", then "``."""
    if not segments:
        raise ValueError("a prompt sequence needs at least one segment, got none")
    parts = [segment_text(segments[0])]
    for prev, seg in zip(segments, segments[1:]):
        if seg.shape != prev.shape:
            raise ValueError(f"the shape cannot change between segments: {prev} -> {seg}")
        if seg.colour != prev.colour and seg.direction != prev.direction:
            parts.append(f"it turns {seg.colour} and moves {seg.direction}")
        elif seg.colour != prev.colour:
            parts.append(f"it turns {seg.colour}")
        else:
            parts.append(f"it moves {seg.direction}")
    return ", then ".join(parts)


_WORD = r"([a-z]+)"
_FIRST = re.compile(rf"^(?:an?|the)\s+{_WORD}\s+{_WORD}\s+moves\s+{_WORD}$")
_TURN_MOVE = re.compile(rf"^it\s+turns\s+{_WORD}\s+and\s+moves\s+{_WORD}$")
_TURN = re.compile(rf"^it\s+turns\s+{_WORD}$")
_MOVE = re.compile(rf"^it\s+moves\s+{_WORD}$")


def parse_prompt(text: str) -> list[Segment]:
    """Parse a story into segments.

    Accepted grammar (case and surrounding spaces ignored): a first clause ``"a <colour> <shape>
    moves <direction>"``, then any number of ``", then "`` clauses among ``"it turns <colour>
    and moves <direction>"``, ``"it turns <colour>"``, ``"it moves <direction>"`` or another
    full first-clause sentence of the same shape.
    """
    clauses = [c.strip() for c in re.split(r",?\s*\bthen\b\s*", text.strip().lower().rstrip("."))]
    if not clauses or not clauses[0]:
        raise ValueError(f"expected a prompt like 'a red circle moves left', got {text!r}")
    segments: list[Segment] = []
    for clause in clauses:
        full = _FIRST.match(clause)
        if full:
            colour, shape, direction = full.groups()
        elif not segments:
            raise ValueError(
                f"the first clause must read 'a <colour> <shape> moves <direction>', got {clause!r}"
            )
        elif m := _TURN_MOVE.match(clause):
            shape = segments[-1].shape
            colour, direction = m.groups()
        elif m := _TURN.match(clause):
            colour, shape, direction = m.group(1), segments[-1].shape, segments[-1].direction
        elif m := _MOVE.match(clause):
            colour, shape, direction = segments[-1].colour, segments[-1].shape, m.group(1)
        else:
            raise ValueError(
                "a continuation clause must read 'it turns <colour> and moves <direction>', "
                f"'it turns <colour>' or 'it moves <direction>', got {clause!r}"
            )
        segments.append(Segment(colour, shape, direction))
    return segments


def is_held_out(segment: Segment) -> bool:
    """Whether a segment triple belongs to the held-out split (see the module docstring)."""
    c = list(COLOURS).index(segment.colour)
    s = SHAPES.index(segment.shape)
    d = list(DIRECTIONS).index(segment.direction)
    return (c + 2 * s + d) % 6 == 0


def all_segments(split: str) -> list[Segment]:
    """Every segment triple of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want = split == "heldout"
    return [
        Segment(c, s, d)
        for c in COLOURS
        for s in SHAPES
        for d in DIRECTIONS
        if is_held_out(Segment(c, s, d)) == want
    ]


def sample_sequence(rng: np.random.Generator, num_segments: int, split: str) -> list[Segment]:
    """Draw a prompt sequence of ``num_segments`` segments of one shape.

    Each switch changes the colour, the direction or both (never neither). In the ``train``
    split every segment is a train triple; in ``heldout`` the first segment is a held-out triple
    and later segments are drawn from all triples.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    pool = all_segments(split)
    segments = [pool[rng.integers(len(pool))]]
    while len(segments) < num_segments:
        prev = segments[-1]
        options = [
            Segment(c, prev.shape, d)
            for c in COLOURS
            for d in DIRECTIONS
            if (c, d) != (prev.colour, prev.direction)
            and (split == "heldout" or not is_held_out(Segment(c, prev.shape, d)))
        ]
        segments.append(options[rng.integers(len(options))])
    return segments


def heldout_prompts(count: int = 16, num_segments: int = 3, seed: int = 1234) -> list[str]:
    """The fixed held-out evaluation stories (deterministic for given arguments)."""
    rng = np.random.default_rng(seed)
    return [story_text(sample_sequence(rng, num_segments, "heldout")) for _ in range(count)]
