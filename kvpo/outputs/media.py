"""Video outputs: uint8 frames, GIF + MP4 files, a contact sheet and the branch-grid image.

Videos from the model are float tensors ``[T, 3, H, W]`` in [0, 1]; files are written from
*frames*, numpy ``uint8`` arrays ``[T, H, W, 3]`` made by :func:`to_uint8` (nearest-neighbour
upscaling, so the toy's 32 x 32 pixels stay sharp). :func:`write_video` writes both a GIF
(Pillow; exact colours when a frame has at most 256 of them) and an H.264 MP4 (yuv420p, plays
everywhere; imageio through imageio-ffmpeg, which ships its own ffmpeg binary).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between tiles (white)
ANCHOR_SEP = 6  # extra pixels above the anchor row of a branch grid, a grey rule in the middle


def to_uint8(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``[T, 3, H, W]`` floats in [0, 1] -> ``[T, H * scale, W * scale, 3]`` uint8 (rounded,
    clamped, nearest upscaling)."""
    frames = video.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 1).cpu().numpy()
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def gif_delay_ms(fps: float) -> int:
    """A GIF frame's delay at ``fps``: GIF delays are whole centiseconds, so the nearest one."""
    return 10 * max(1, round(100 / fps))


def write_gif(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """Animated, looping GIF of ``frames [T, H, W, 3]`` uint8, each shown
    :func:`gif_delay_ms` ``(fps)``; Pillow stores a run of identical frames once, with the
    run's summed delay (the same animation)."""
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    duration = gif_delay_ms(fps)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, quality: float = 8) -> Path:
    """H.264 MP4 (yuv420p) of ``frames [T, H, W, 3]`` uint8; an odd height or width loses its
    last pixel row / column (yuv420p needs even sizes). ``quality``: imageio-ffmpeg's 0-10."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401 (the ffmpeg binary imageio's writer runs)
    except ImportError as err:
        raise ImportError(
            f"writing MP4 videos needs imageio and imageio-ffmpeg ({err}): "
            "pip install imageio imageio-ffmpeg"
        ) from err
    path = Path(path)
    even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    imageio.mimwrite(
        path, list(even), fps=fps, codec="libx264", quality=quality, macro_block_size=1
    )
    return path


def write_video(frames: np.ndarray, stem: str | Path, fps: float) -> tuple[Path, Path]:
    """Write ``<stem>.gif`` and ``<stem>.mp4`` of ``frames [T, H, W, 3]`` uint8; returns both."""
    return write_gif(frames, f"{stem}.gif", fps), write_mp4(frames, f"{stem}.mp4", fps)


def side_by_side(videos: torch.Tensor, scale: int = 1, gap: int = GAP) -> np.ndarray:
    """``videos [B, T, 3, H, W]`` in [0, 1] -> frames ``[T, H*s, B*(W*s + gap) - gap, 3]``:
    the videos next to each other, ``gap`` white pixels apart (e.g. a group's G branches and
    its anchor, one file per step)."""
    tiles = [to_uint8(v, scale) for v in videos]
    t, h, w, _ = tiles[0].shape
    out = np.full((t, h, len(tiles) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for b, tile in enumerate(tiles):
        out[:, :, b * (w + gap) : b * (w + gap) + w] = tile
    return out


def contact_sheet(videos: Sequence[np.ndarray], gap: int = GAP) -> Image.Image:
    """One row of frames per video (each ``[T, H, W, 3]`` uint8, same shape), ``gap`` grey
    pixels apart: ``len(videos) * (H + gap) + gap`` by ``T * (W + gap) + gap`` pixels."""
    t, h, w, _ = videos[0].shape
    sheet = np.full((len(videos) * (h + gap) + gap, t * (w + gap) + gap, 3), 96, dtype=np.uint8)
    for r, frames in enumerate(videos):
        for c, frame in enumerate(frames):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            sheet[y : y + h, x : x + w] = frame
    return Image.fromarray(sheet)


def branch_labels(
    branch_rewards: Sequence[float], anchor_reward: float, advantages: Sequence[float] | None
) -> list[str]:
    """Row labels of :func:`branch_grid`: ``"branch 3  r=0.512  A=+1.20"`` per branch (no
    ``A=`` without ``advantages``), then ``"anchor  r=0.480"``."""
    labels = []
    for g, reward in enumerate(branch_rewards):
        adv = "" if advantages is None else f"  A={float(advantages[g]):+.2f}"
        labels.append(f"branch {g}  r={float(reward):.3f}{adv}")
    return [*labels, f"anchor  r={float(anchor_reward):.3f}"]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (its fixed bitmap font without FreeType)."""
    return ImageFont.load_default(size=size)


def branch_grid(
    videos: torch.Tensor,
    labels: Sequence[str],
    frames: range | slice,
    scale: int = 4,
    font_size: int | None = None,
    label_width: int | None = None,
) -> Image.Image:
    """The fork window of a group as one image: a row per video of ``videos [G + 1, T, 3, H, W]``
    (the G branches, then the anchor), a column per frame index in ``frames`` (a range or a
    slice of ``T``), each row's text of ``labels`` on its left, the frame indices on top.

    Geometry, with tiles ``th x tw = H * scale x W * scale``, ``n`` frames, ``R = G + 1`` rows,
    ``font_size`` (default ``clamp(th // 7, 12, 22)``) and ``pad = font_size // 2``: a header of
    ``font_size + 2 * pad`` pixels; labels in the first ``label_width`` pixels (default: the
    widest label + ``2 * pad``); tile ``(r, c)`` at ``x = label_width + c * (tw + GAP)``,
    ``y = header + r * (th + GAP)`` (``+ ANCHOR_SEP`` for the anchor row); the image is
    ``label_width + n * (tw + GAP)`` by ``header + R * (th + GAP) + ANCHOR_SEP`` pixels, white.
    """
    rows = videos.shape[0]
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} videos (G branches + the anchor)")
    index = list(frames) if isinstance(frames, range) else list(range(videos.shape[1]))[frames]
    if not index:
        raise ValueError(f"no frames selected by {frames} of {videos.shape[1]}")
    th, tw = videos.shape[3] * scale, videos.shape[4] * scale
    font_size = font_size or max(12, min(22, th // 7))
    pad = font_size // 2
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if label_width is None:
        label_width = max(probe.textbbox((0, 0), s, font=font)[2] for s in labels) + 2 * pad
    header = font_size + 2 * pad
    size = (label_width + len(index) * (tw + GAP), header + rows * (th + GAP) + ANCHOR_SEP)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def text(x: float, y: float, s: str, fill, centre: bool = False) -> None:
        """``s`` with its ink's left (or centre) at ``x`` and vertical middle at ``y``."""
        left, top, right, bottom = draw.textbbox((0, 0), s, font=font)
        x = x - (left + right) / 2 if centre else x - left
        draw.text((x, y - (top + bottom) / 2), s, font=font, fill=fill)

    text(pad, header / 2, "frame", (90, 90, 90))
    for c, t in enumerate(index):
        text(label_width + c * (tw + GAP) + tw / 2, header / 2, str(t), (90, 90, 90), centre=True)
    rule = header + (rows - 1) * (th + GAP) + ANCHOR_SEP // 2 - 1
    draw.line([(0, rule), (size[0], rule)], fill=(170, 170, 170), width=1)
    for r in range(rows):
        y = header + r * (th + GAP) + (ANCHOR_SEP if r == rows - 1 else 0)
        text(pad, y + th / 2, labels[r], (0, 0, 0))
        tiles = to_uint8(videos[r, index], scale)
        for c, tile in enumerate(tiles):
            image.paste(Image.fromarray(tile), (label_width + c * (tw + GAP), y))
    return image
