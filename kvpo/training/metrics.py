"""Training telemetry: a JSONL stream, optional TensorBoard, phase timers, GIFs, a reward curve.

Only rank 0 writes (the trainer passes ``enabled=False`` elsewhere). Each JSONL line is one
flat record ``{"step": n, "time": s, "<group>/<name>": value, ...}``; lists (per-branch values)
are kept as lists. The reward-curve PNG and the sample GIFs are drawn with Pillow (no plotting
library needed).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def flatten(record: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; tensors become numbers or lists."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, torch.Tensor):
            out[name] = value.item() if value.numel() == 1 else value.detach().cpu().tolist()
        else:
            out[name] = value
    return out


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` (and TensorBoard when asked)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._start = time.time()
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, record: dict) -> dict:
        flat = {"step": step, "time": round(time.time() - self._start, 3), **flatten(record)}
        if not self.enabled:
            return flat
        with open(self.path, "a") as f:
            f.write(json.dumps(flat, default=float) + "\n")
        if self._tb is not None:
            for key, value in flat.items():
                if isinstance(value, int | float) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        return flat

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class PhaseTimer:
    """Wall time per named phase of a step; ``with timer("rollout"): ...``.

    With ``bar`` (a tqdm bar over the phases of one step) each finished phase advances it and
    the bar's postfix names the running phase.
    """

    def __init__(self, device: torch.device | None = None, bar=None):
        self.device = device
        self.bar = bar
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if self.bar is not None:
                self.bar.update(1)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated bytes on ``device``; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def write_gif(path: str | Path, video: torch.Tensor, fps: int = 8, scale: int = 4) -> Path:
    """Save ``video [T, 3, H, W]`` (floats in [0, 1]) as an animated GIF, upscaled ``scale``x."""
    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    images = [
        Image.fromarray(f.permute(1, 2, 0).numpy()).resize(
            (f.shape[2] * scale, f.shape[1] * scale), Image.NEAREST
        )
        for f in frames
    ]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def write_video_grid_gif(path: str | Path, videos: torch.Tensor, fps: int = 8) -> Path:
    """Save ``videos [B, T, 3, H, W]`` side by side (1-pixel white gaps) as one GIF."""
    B, T, C, H, W = videos.shape
    grid = torch.ones(T, C, H, B * (W + 1) - 1, dtype=videos.dtype)
    for b in range(B):
        grid[..., b * (W + 1) : b * (W + 1) + W] = videos[b].cpu()
    return write_gif(path, grid, fps=fps)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def write_curve_png(
    path: str | Path, series: dict[str, list[tuple[float, float]]], title: str, size=(720, 400)
) -> Path:
    """Line plot of ``{name: [(x, y), ...]}`` with axes, ticks and a legend (Pillow only)."""
    width, height = size
    left, right, top, bottom = 60, 170, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def to_px(x, y):
            px = left + (x - x0) / (x1 - x0) * (width - left - right)
            py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
            return px, py

        for i in range(5):
            y = y0 + (y1 - y0) * i / 4
            _, py = to_px(x0, y)
            draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
            draw.text((4, py - 6), f"{y:.3f}", fill="black")
            x = x0 + (x1 - x0) * i / 4
            px, _ = to_px(x, y0)
            draw.text((px - 8, height - bottom + 6), f"{x:g}", fill="black")
        for k, (name, pts) in enumerate(series.items()):
            colour = PALETTE[k % len(PALETTE)]
            xy = [to_px(x, y) for x, y in pts if math.isfinite(y)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for px, py in xy:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            draw.line(
                [(width - right + 10, top + 16 * k + 6), (width - right + 30, top + 16 * k + 6)],
                fill=colour,
                width=3,
            )
            draw.text((width - right + 36, top + 16 * k), name, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    path = Path(path)
    img.save(path)
    return path
