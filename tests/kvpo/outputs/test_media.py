"""Video files and images of kvpo.outputs.media, written and read back."""

import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from kvpo.outputs.media import (
    ANCHOR_SEP,
    GAP,
    branch_grid,
    branch_labels,
    contact_sheet,
    gif_delay_ms,
    side_by_side,
    to_uint8,
    write_gif,
    write_mp4,
    write_video,
)


def palette_video(t=5, h=6, w=7, colours=40, seed=0) -> torch.Tensor:
    """``[T, 3, H, W]`` floats that are exact multiples of 1/255, from ``colours`` colours."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (colours, 3), generator=g)
    index = torch.randint(0, colours, (t, h, w), generator=g)
    return palette[index].permute(0, 3, 1, 2).float() / 255


def test_to_uint8_rounds_clamps_and_upscales():
    video = torch.tensor([0.5, -0.1, 1.2, 10 / 255]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    frames = to_uint8(video, scale=3)
    assert frames.shape == (2, 6, 6, 3) and frames.dtype == np.uint8
    expected = {(0, 0): 128, (0, 1): 0, (1, 0): 255, (1, 1): 10}  # round(127.5) is 128
    for (y, x), value in expected.items():
        block = frames[:, 3 * y : 3 * y + 3, 3 * x : 3 * x + 3]
        assert (block == value).all()


def read_gif(path, delay_ms: int) -> np.ndarray:
    """The GIF's frames at every ``delay_ms`` tick (a frame shown for k ticks appears k times)."""
    image = Image.open(path)
    frames = []
    for i in range(image.n_frames):
        image.seek(i)
        ticks, rest = divmod(image.info["duration"], delay_ms)
        assert rest == 0 and ticks >= 1
        frames += [np.array(image.convert("RGB"))] * ticks
    return np.stack(frames)


def test_gif_delay_is_the_nearest_centisecond():
    assert [gif_delay_ms(f) for f in (8, 6, 10, 25, 1000)] == [120, 170, 100, 40, 10]


def test_gif_frames_equal_the_input(tmp_path):
    frames = to_uint8(palette_video(colours=200), scale=2)
    path = write_gif(frames, tmp_path / "v.gif", fps=6)
    assert Image.open(path).n_frames == len(frames)  # random frames: none merged
    assert np.array_equal(read_gif(path, 170), frames)


def test_write_video_writes_gif_and_h264_mp4(tmp_path):
    colour = torch.tensor([200, 40, 90]) / 255
    video = colour.view(1, 3, 1, 1).expand(7, 3, 12, 16)
    frames = to_uint8(video, scale=4)
    gif, mp4 = write_video(frames, tmp_path / "sample_0.5", fps=6)
    assert (gif.name, mp4.name) == ("sample_0.5.gif", "sample_0.5.mp4")
    assert Image.open(gif).n_frames == 1  # 7 identical frames: one, shown 7 x 170 ms
    assert np.array_equal(read_gif(gif, 170), frames)
    back = iio.imread(mp4, plugin="FFMPEG")
    assert back.shape == (7, 48, 64, 3)
    error = np.abs(back.astype(int) - np.array([200, 40, 90]))
    assert error.max() <= 4, error.max()
    meta = iio.immeta(mp4, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["fps"] == pytest.approx(6)


def test_mp4_of_odd_size_loses_the_last_row_and_column(tmp_path):
    frames = np.full((3, 33, 35, 3), 128, dtype=np.uint8)
    back = iio.imread(write_mp4(frames, tmp_path / "odd.mp4", fps=4), plugin="FFMPEG")
    assert back.shape == (3, 32, 34, 3)


def test_mp4_without_imageio_ffmpeg_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import of it raises ImportError
    with pytest.raises(ImportError, match="pip install imageio imageio-ffmpeg"):
        write_mp4(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "x.mp4", fps=4)


def test_side_by_side_places_videos_with_white_gaps():
    videos = torch.stack([palette_video(seed=s) for s in range(3)])  # [3, 5, 3, 6, 7]
    out = side_by_side(videos, scale=2, gap=3)
    assert out.shape == (5, 12, 3 * 14 + 2 * 3, 3)
    for b in range(3):
        x = b * (14 + 3)
        assert np.array_equal(out[:, :, x : x + 14], to_uint8(videos[b], 2))
    assert (out[:, :, 14:17] == 255).all() and (out[:, :, 31:34] == 255).all()


def test_contact_sheet_rows_of_frames():
    videos = [to_uint8(palette_video(t=4, seed=s), 1) for s in range(2)]
    sheet = np.array(contact_sheet(videos, gap=2))
    assert sheet.shape == (2 * (6 + 2) + 2, 4 * (7 + 2) + 2, 3)
    assert np.array_equal(sheet[2 + 8 : 2 + 8 + 6, 2 + 3 * 9 : 2 + 3 * 9 + 7], videos[1][3])


def test_branch_labels_text():
    labels = branch_labels([0.5123, 0.25], 0.48, [1.2, -0.504])
    assert labels == ["branch 0  r=0.512  A=+1.20", "branch 1  r=0.250  A=-0.50", "anchor  r=0.480"]
    assert branch_labels([0.1], 0.2, None) == ["branch 0  r=0.100", "anchor  r=0.200"]


def test_branch_grid_geometry_tiles_and_labels():
    G, T, H, W, scale, font, label_w = 3, 10, 6, 5, 3, 12, 150
    videos = torch.stack([palette_video(t=T, h=H, w=W, seed=s) for s in range(G + 1)])
    labels = branch_labels([0.1, 0.2, 0.3], 0.4, [1.0, -1.0, 0.0])
    window = range(2, 6)
    grid = branch_grid(videos, labels, window, scale, font_size=font, label_width=label_w)
    th, tw, header = H * scale, W * scale, font + 2 * (font // 2)
    assert grid.size == (label_w + 4 * (tw + GAP), header + (G + 1) * (th + GAP) + ANCHOR_SEP)
    pixels = np.array(grid)
    for r in range(G + 1):
        y = header + r * (th + GAP) + (ANCHOR_SEP if r == G else 0)
        for c, t in enumerate(window):
            x = label_w + c * (tw + GAP)
            assert np.array_equal(
                pixels[y : y + th, x : x + tw], to_uint8(videos[r, t : t + 1], scale)[0]
            )
        label_band = pixels[y : y + th, :label_w]
        assert (label_band < 128).all(axis=-1).sum() > 20, f"no dark text in row {r}'s label"
    blank = np.array(branch_grid(videos, [""] * 4, window, scale, font, label_w))
    band = blank[header : header + th, :label_w]
    assert (band == 255).all()  # so the text above is what made row 0's band differ
    same = branch_grid(videos, labels, slice(2, 6), scale, font_size=font, label_width=label_w)
    assert np.array_equal(np.array(same), pixels)


def test_branch_grid_default_label_column_fits_the_text():
    videos = torch.stack([palette_video(t=4, seed=s) for s in range(3)])
    short = branch_grid(videos, ["a", "b", "c"], range(4), scale=4)
    long = branch_grid(videos, ["a", "branch 1  r=0.512  A=+1.20", "c"], range(4), scale=4)
    assert long.size[1] == short.size[1] and long.size[0] > short.size[0] + 100
    with pytest.raises(ValueError, match="3 videos"):
        branch_grid(videos, ["a", "b"], range(4))
