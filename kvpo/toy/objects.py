"""Per-frame object measurements from pixels: the tracked object and what it looks like.

Plain image processing, batched over all frames at once, on the frames' device:

- foreground: ``value = max(R, G, B) > 0.5``;
- connected components of the foreground (8-connected), by iterated 3x3 max-pooling of pixel
  labels until nothing changes;
- the *tracked object* of a frame is its largest component. Measured on it: area (pixels),
  centroid (x, y at pixel centres), bounding-box fill ratio ``area / (bbox_w * bbox_h)``, mean
  RGB, its hue (degrees) and saturation ``(max - min) / max``, and its vertical skew
  ``(centroid_y - bbox_middle_y) / bbox_h`` (a triangle with its apex up: about 1/7; a circle or
  a square: 0);
- ``split``: a second component of at least ``max(3, 0.2 * area)`` pixels exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOREGROUND = 0.5


@dataclass
class FrameObjects:
    """Measurements of N frames. Shapes: [N] unless stated; fp32 unless stated.

    area: pixels of the tracked object (0 when the frame has no foreground).
    centre: [N, 2] (x, y). fill: bbox fill ratio. skew: vertical skew. rgb: [N, 3] mean colour.
    hue: degrees in [0, 360). saturation: [0, 1]. split: bool.
    mask: [N, H, W] bool, the tracked object. value: [N, H, W] max over channels.
    """

    area: torch.Tensor
    centre: torch.Tensor
    fill: torch.Tensor
    skew: torch.Tensor
    rgb: torch.Tensor
    hue: torch.Tensor
    saturation: torch.Tensor
    split: torch.Tensor
    mask: torch.Tensor
    value: torch.Tensor


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components. mask: [N, H, W] bool -> labels [N, H, W] int64.

    Background is 0; each component gets the largest 1-based flat pixel index it contains.
    """
    n, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, h, w)
    labels = torch.where(mask, ids, torch.zeros((), device=mask.device))
    for _ in range(h * w):
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
        grown = torch.where(mask, grown, torch.zeros((), device=mask.device))
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def hue_saturation(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV hue in degrees [0, 360) and saturation of colours rgb: [..., 3] in [0, 1]."""
    r, g, b = rgb.unbind(-1)
    top, _ = rgb.max(-1)
    bottom, _ = rgb.min(-1)
    span = (top - bottom).clamp_min(1e-6)
    hue = torch.where(
        top == r,
        ((g - b) / span) % 6,
        torch.where(top == g, (b - r) / span + 2, (r - g) / span + 4),
    )
    saturation = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-6), torch.zeros_like(top))
    return (hue * 60) % 360, saturation


def measure(frames: torch.Tensor) -> FrameObjects:
    """Measure the tracked object of each frame. frames: [N, 3, H, W] float in [0, 1]."""
    n, _, h, w = frames.shape
    frames = frames.float()
    value = frames.amax(1)
    labels = label_components(value > FOREGROUND)
    sizes = torch.zeros(n, h * w + 1, device=frames.device)
    sizes.scatter_add_(1, labels.view(n, -1), torch.ones(n, h * w, device=frames.device))
    sizes[:, 0] = 0
    top2, top_label = sizes.topk(2, dim=1)
    area, second = top2[:, 0], top2[:, 1]
    mask = (labels == top_label[:, :1].view(n, 1, 1)) & (area > 0).view(n, 1, 1)
    weight = mask.float()
    count = area.clamp_min(1)
    ys = torch.arange(h, device=frames.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=frames.device, dtype=torch.float32) + 0.5
    cx = (weight.sum(1) * xs).sum(1) / count
    cy = (weight.sum(2) * ys).sum(1) / count
    cols, rows = mask.any(1).float(), mask.any(2).float()
    height = rows.sum(1)
    bbox = cols.sum(1) * height
    fill = area / bbox.clamp_min(1)
    top = torch.where(rows > 0, ys, torch.full_like(ys, float(h))).amin(1) - 0.5
    skew = torch.where(area > 0, (cy - (top + height / 2)) / height.clamp_min(1), 0.0)
    rgb = (frames * weight.unsqueeze(1)).sum((2, 3)) / count.unsqueeze(1)
    hue, saturation = hue_saturation(rgb)
    split = second >= torch.clamp(0.2 * area, min=3.0)
    return FrameObjects(
        area, torch.stack([cx, cy], 1), fill, skew, rgb, hue, saturation, split, mask, value
    )
