"""Is a toy frame on the data manifold? Its distance to the nearest valid render, and validity.

Every valid toy frame is a render of :mod:`kvpo.toy.world`: one hard-edged circle, square or
triangle (:func:`kvpo.toy.world.shape_mask`) of radius ``r`` in the world's range, its centre in
the range the world keeps it in (``[r + margin, size - r - margin]`` per axis), filled with one
palette colour on an exactly black background. Two measurements per frame ``x [3, H, W]`` in
[0, 1]:

- **render distance**: ``min over renders y of sqrt(mean((x - y)^2))`` (RMS over the 3 H W
  values, in units of full scale). For a fixed object mask ``M`` the best colour is the palette
  colour minimising ``|x|^2 - 2 c . (M x) + |M| |c|^2``; masks are searched coarse to fine: every
  shape on a 1-px grid of centres at radii 5, 5.5, 6 (the world's range), then the best
  candidate of each shape on a 0.25-px grid (radius step 0.25), then the best one on a 0.0625-px
  grid (radius step 0.0625). It is exact for frames the grid reaches and an upper bound
  otherwise; a render of the world scores 0 or the cost of the few rim pixels the finest grid
  misses (tests/kvpo/study/test_manifold.py measures that residual).
- **valid scene**: the three properties of every render, with a tolerance of
  :data:`TOLERANCE` (10% of full scale): *one object* (exactly one 8-connected component of
  foreground, ``max(R, G, B) > 0.5``, of the toy reward's object size, 6 to 256 pixels);
  *palette colour* (the object's pixels lie within :data:`TOLERANCE` of one palette colour on
  average, RGB distance); *clean background* (no pixel outside the object brighter than
  :data:`TOLERANCE`, so soft or blurred rims fail).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpo.toy.objects import FOREGROUND, label_components
from kvpo.toy.prompts import COLOURS, SHAPES
from kvpo.toy.rewards import MAX_AREA, MIN_AREA
from kvpo.toy.world import WorldConfig, shape_mask

TOLERANCE = 0.1
PALETTE = torch.tensor(list(COLOURS.values()))  # [6, 3]
_CROP = 16  # pixels of the square a refined mask is built in
_STAGES = ((0.25, 0.25, 2, 2), (0.0625, 0.0625, 2, 2))  # centre step, radius step, half-widths


@dataclass
class ManifoldScores:
    """Per frame ``[N]``: ``distance`` (RMS to the nearest render), ``valid`` (bool) and its
    three parts ``one_object``, ``palette``, ``clean_background`` (bool)."""

    distance: torch.Tensor
    valid: torch.Tensor
    one_object: torch.Tensor
    palette: torch.Tensor
    clean_background: torch.Tensor


def _masks(shape: str, params: torch.Tensor, size: int) -> torch.Tensor:
    """``params [M, 3]`` (cx, cy, r) -> flat masks ``[M, size * size]`` fp32."""
    mask = shape_mask(shape, params[:, :2], params[:, 2].view(-1, 1, 1), size, size)
    return mask.flatten(1).float()


def _valid_params(params: torch.Tensor, world: WorldConfig) -> torch.Tensor:
    """Clamp ``(cx, cy, r)`` into the world's ranges (radius first, then the centre's)."""
    r = params[..., 2].clamp(*world.radius)
    lo = r + world.margin
    cx = torch.minimum(torch.maximum(params[..., 0], lo), world.width - lo)
    cy = torch.minimum(torch.maximum(params[..., 1], lo), world.height - lo)
    return torch.stack([cx, cy, r], -1)


def _coarse_params(world: WorldConfig) -> torch.Tensor:
    rows = []
    for r in (sum(world.radius) / 2,):
        lo = r + world.margin
        xs = torch.arange(lo, world.width - lo + 1e-6, 1.0)
        ys = torch.arange(lo, world.height - lo + 1e-6, 1.0)
        gx, gy = torch.meshgrid(xs, ys, indexing="xy")
        rows.append(torch.stack([gx.flatten(), gy.flatten(), torch.full_like(gx.flatten(), r)], 1))
    return torch.cat(rows)


def _costs(masks: torch.Tensor, frames: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[..., M]`` of frames (flat pixels ``[..., P, 3]``, squared norms
    ``[...]`` of the whole frames) to the best palette colour on each mask ``[..., M, P]``."""
    palette = PALETTE.to(frames)
    mx = masks @ frames  # [..., M, 3]: the sum of the frame over each mask
    area = masks.sum(-1, keepdim=True)  # [..., M, 1]
    per_colour = -2 * mx @ palette.T + area * (palette * palette).sum(-1)  # [..., M, 6]
    return norm.unsqueeze(-1) + per_colour.amin(-1)


def render_distance(frames: torch.Tensor, world: WorldConfig | None = None, chunk: int = 256):
    """RMS distance ``[N]`` of ``frames [N, 3, H, W]`` in [0, 1] to the nearest valid render."""
    world = world or WorldConfig()
    n = frames.shape[0]
    flat = frames.detach().float().cpu().flatten(2).transpose(1, 2)  # [N, P, 3]
    coarse = _coarse_params(world)
    if world.height != world.width:
        raise ValueError(f"square frames only, got {world.height} x {world.width}")
    bank = {shape: _masks(shape, coarse, world.width) for shape in SHAPES}
    out = torch.empty(n)
    for a in range(0, n, chunk):
        x = flat[a : a + chunk]
        best = torch.full((x.shape[0],), float("inf"))
        for shape in SHAPES:
            norm = (x * x).sum((-1, -2))
            c, i = _costs(bank[shape], x.unsqueeze(1), norm.unsqueeze(1)).squeeze(1).min(-1)
            cand = {"cost": c, "params": coarse[i], "shape": shape}
            for stage in _STAGES:
                cand = _refine(cand, x, world, *stage)
            best = torch.minimum(best, cand["cost"])
        out[a : a + chunk] = (best.clamp_min(0) / (3 * x.shape[1])).sqrt()
    return out


def _refine(cand: dict, x: torch.Tensor, world: WorldConfig, step, rstep, half, rhalf) -> dict:
    """The best render of ``cand["shape"]`` on a finer grid around each frame's parameters:
    ``+-half`` centre steps and ``+-rhalf`` radius steps. Masks are built in a
    :data:`_CROP`-pixel square around each frame's candidate (it holds any object of the
    world's radius whose centre is within a pixel), so only those pixels enter ``M x``."""
    offsets = torch.arange(-half, half + 1, dtype=torch.float32) * step
    radii = torch.arange(-rhalf, rhalf + 1, dtype=torch.float32) * rstep
    dx, dy, dr = torch.meshgrid(offsets, offsets, radii, indexing="ij")
    delta = torch.stack([dx.flatten(), dy.flatten(), dr.flatten()], 1)  # [K, 3]
    params = _valid_params(cand["params"].unsqueeze(1) + delta, world)  # [n, K, 3]
    n, k = params.shape[:2]
    # crop origin per frame, clamped into the image
    origin = torch.stack(
        [
            (cand["params"][:, 0].round() - _CROP // 2).clamp(0, world.width - _CROP),
            (cand["params"][:, 1].round() - _CROP // 2).clamp(0, world.height - _CROP),
        ],
        1,
    )  # [n, 2] (x0, y0)
    local = params.clone()
    local[..., :2] -= origin.unsqueeze(1)
    masks = _masks(cand["shape"], local.view(-1, 3), _CROP).view(n, k, -1)
    ox, oy = origin[:, 0].long(), origin[:, 1].long()
    rows = (oy.view(n, 1) + torch.arange(_CROP)).view(n, _CROP, 1)
    cols = (ox.view(n, 1) + torch.arange(_CROP)).view(n, 1, _CROP)
    index = (rows * world.width + cols).view(n, -1, 1).expand(-1, -1, 3)  # [n, CROP^2, 3]
    crop = x.gather(1, index)
    cost = _costs(masks, crop, norm=(x * x).sum((-1, -2)))  # [n, K]
    c, i = cost.min(-1)
    better = c < cand["cost"]
    chosen = params[torch.arange(n), i]
    return {
        "cost": torch.where(better, c, cand["cost"]),
        "params": torch.where(better.unsqueeze(1), chosen, cand["params"]),
        "shape": cand["shape"],
    }


def valid_scene(frames: torch.Tensor) -> ManifoldScores:
    """Validity checks of ``frames [N, 3, H, W]`` in [0, 1] (module docstring); ``distance`` is
    left empty (see :func:`manifold_scores`)."""
    frames = frames.detach().float().cpu()
    n = frames.shape[0]
    value = frames.amax(1)
    labels = label_components(value > FOREGROUND)
    flat = labels.flatten(1)
    counts = torch.zeros(n, flat.shape[1] + 1).scatter_add_(1, flat, torch.ones_like(flat).float())
    counts[:, 0] = 0
    components = (counts > 0).sum(1)
    area, top = counts.max(1)
    one = (components == 1) & (area >= MIN_AREA) & (area <= MAX_AREA)
    obj = labels == top.view(n, 1, 1)
    obj &= area.view(n, 1, 1) > 0
    pixels = frames.permute(0, 2, 3, 1).unsqueeze(-2)  # [N, H, W, 1, 3]
    nearest = (pixels - PALETTE).norm(dim=-1).amin(-1)  # [N, H, W]
    weight = obj.float()
    off = (nearest * weight).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1)
    palette = one & (off <= TOLERANCE)
    outside = torch.where(obj, torch.zeros_like(value), value)
    clean = outside.flatten(1).amax(1) <= TOLERANCE
    return ManifoldScores(torch.empty(0), one & palette & clean, one, palette, clean)


def manifold_scores(frames: torch.Tensor, world: WorldConfig | None = None) -> ManifoldScores:
    """Render distance and validity of ``frames [N, 3, H, W]`` in [0, 1]."""
    scores = valid_scene(frames)
    scores.distance = render_distance(frames, world)
    return scores
