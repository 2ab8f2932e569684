"""How different are the branches of a group? Distances and semantic attributes.

Over the frames a group's rows can differ in (from the fork on), for the ``G`` branches:

- **latent L2**: the mean over branch pairs of the RMS difference of their latents;
- **pixel**: the mean over branch pairs of the mean absolute difference of their decoded frames
  (in [0, 1]: a fraction of full scale);
- **semantic attributes** (toy): per frame the tracked object of :func:`kvpo.toy.objects.measure`
  (the rewards' own analysis): present (the reward's object size), colour (nearest palette
  colour to its mean RGB), shape (nearest of :data:`kvpo.toy.rewards.SHAPE_TARGETS` in bounding
  box fill and vertical skew, each in units of its tolerance), centre (px) and velocity
  (centre step, px/frame). Spread over branch pairs: the share of (frame, pair) where presence
  differs; among frames where both have the object, the share where colour / shape differ and the
  mean distance of centres and of velocities.

Identical branches give 0 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpo.toy.objects import measure
from kvpo.toy.prompts import COLOURS, SHAPES
from kvpo.toy.rewards import MAX_AREA, MIN_AREA, SHAPE_TARGETS


def _pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(n, n, offset=1)
    return i, j


def latent_l2(latents: torch.Tensor) -> float:
    """Mean pairwise RMS difference of ``latents [G, ...]`` (0 for one row)."""
    x = latents.detach().double().flatten(1)
    if x.shape[0] < 2:
        return 0.0
    i, j = _pairs(x.shape[0])
    return float(((x[i] - x[j]) ** 2).mean(1).sqrt().mean())


def pixel_difference(videos: torch.Tensor) -> float:
    """Mean pairwise mean absolute difference of ``videos [G, ...]`` in [0, 1]."""
    x = videos.detach().double().flatten(1)
    if x.shape[0] < 2:
        return 0.0
    i, j = _pairs(x.shape[0])
    return float((x[i] - x[j]).abs().mean(1).mean())


@dataclass
class Attributes:
    """Per video and frame ``[G, T]``: ``present`` (bool), ``colour``, ``shape`` (class indices
    into :data:`COLOURS` / :data:`SHAPES`), ``centre [G, T, 2]`` and ``velocity [G, T, 2]``
    (``velocity[:, 0] = 0``; valid where the object is present in this and the previous
    frame)."""

    present: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    centre: torch.Tensor
    velocity: torch.Tensor


def attributes(videos: torch.Tensor) -> Attributes:
    """The object's attributes in every frame of ``videos [G, T, 3, H, W]`` in [0, 1]."""
    g, t = videos.shape[:2]
    obj = measure(videos.detach().float().cpu().flatten(0, 1))
    present = ((obj.area >= MIN_AREA) & (obj.area <= MAX_AREA)).view(g, t)
    palette = torch.tensor(list(COLOURS.values()))
    colour = (obj.rgb.unsqueeze(1) - palette).norm(dim=-1).argmin(-1).view(g, t)
    gaps = []
    for name in SHAPES:
        (f0, f_free, f_width), (k0, k_free, k_width) = SHAPE_TARGETS[name]
        fill_gap = (obj.fill - f0).abs() / (f_free + f_width)
        gaps.append(torch.maximum(fill_gap, (obj.skew - k0).abs() / (k_free + k_width)))
    shape = torch.stack(gaps, -1).argmin(-1).view(g, t)
    centre = obj.centre.view(g, t, 2)
    velocity = torch.zeros_like(centre)
    velocity[:, 1:] = centre[:, 1:] - centre[:, :-1]
    return Attributes(present, colour, shape, centre, velocity)


def attribute_spread(attrs: Attributes) -> dict[str, float]:
    """Spread of the attributes over branch pairs (module docstring). Keys: ``presence``,
    ``colour``, ``shape`` (shares of disagreeing (frame, pair)), ``position`` (px),
    ``velocity`` (px/frame); a share or mean with nothing to average over is 0."""
    g = attrs.present.shape[0]
    if g < 2:
        return dict.fromkeys(("presence", "colour", "shape", "position", "velocity"), 0.0)
    i, j = _pairs(g)
    pi, pj = attrs.present[i], attrs.present[j]
    both = pi & pj
    moving = both.clone()
    moving[:, 0] = False
    moving[:, 1:] &= attrs.present[i][:, :-1] & attrs.present[j][:, :-1]

    def share(mask, where):
        n = int(where.sum())
        return float((mask & where).sum()) / n if n else 0.0

    def mean(values, where):
        n = int(where.sum())
        return float(values[where].double().mean()) if n else 0.0

    return {
        "presence": float((pi != pj).double().mean()),
        "colour": share(attrs.colour[i] != attrs.colour[j], both),
        "shape": share(attrs.shape[i] != attrs.shape[j], both),
        "position": mean((attrs.centre[i] - attrs.centre[j]).norm(dim=-1), both),
        "velocity": mean((attrs.velocity[i] - attrs.velocity[j]).norm(dim=-1), moving),
    }
