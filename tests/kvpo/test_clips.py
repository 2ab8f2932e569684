"""Scoring clip geometry (``kvpo.rewards.clips``): segments, clips that span prompt switches, the
global clips (whole segments or centred windows clamped to the video), Wan's 4x temporal
mapping, and ``score_clips`` against a reward written here. Every window is written out by hand."""

import pytest
import torch

from kvpo.rewards.clips import (
    Clip,
    VideoLayout,
    clip_for,
    global_clips,
    local_reward_input,
    score_clips,
)
from kvpo.video_model import VideoModel, wan_video_frame

# 21 latent frames (7 blocks of 3), prompt switches at latent frames 9 and 15; Wan decodes latent
# frame 0 to video frame 0 and latent frame f > 0 to video frames 4f-3 .. 4f: 81 video frames,
# switches at 4*9-3 = 33 and 4*15-3 = 57.
LATENT = VideoLayout(21, (9, 15))
VIDEO = VideoLayout(81, (33, 57))
ABC = ["a", "b", "c"]


def test_wan_video_frame():
    assert [wan_video_frame(f) for f in (0, 1, 2, 3, 9, 15, 21, 147)] == [
        0, 1, 5, 9, 33, 57, 81, 585,
    ]  # fmt: skip
    assert wan_video_frame(-1) == 0
    assert wan_video_frame(3, stride=2) == 5  # 2 * 3 - 1


def test_segments_and_segment_of():
    layout = VideoLayout(12, (4, 8))
    assert layout.segments(3) == [(0, 4), (4, 8), (8, 12)]
    assert layout.segments(2) == [(0, 4), (4, 12)]  # the last prompt runs to the end
    assert layout.segments(1) == [(0, 12)]
    assert VideoLayout(12).segments(1) == [(0, 12)]
    assert [layout.segment_of(f) for f in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert VIDEO.segments(3) == [(0, 33), (33, 57), (57, 81)]
    assert [VIDEO.segment_of(f) for f in (0, 32, 33, 56, 57, 80)] == [0, 0, 1, 1, 2, 2]


def test_mapped_latent_to_video():
    assert LATENT.mapped(wan_video_frame) == VIDEO
    assert LATENT.mapped(lambda f: f) == LATENT
    # 24 latent frames, switches every 6: 4*24-3 = 93 frames, switches 21, 45, 69
    assert VideoLayout(24, (6, 12, 18)).mapped(wan_video_frame) == VideoLayout(93, (21, 45, 69))
    # the LongLive config: 147 latent frames, switches at 39, 75, 111
    longlive = VideoLayout(147, (39, 75, 111)).mapped(wan_video_frame)
    assert longlive == VideoLayout(585, (153, 297, 441))


@pytest.mark.parametrize(
    ("lo", "hi", "prompt", "starts"),
    [
        (0, 33, "a", (0,)),  # exactly segment 0
        (33, 45, "b", (0,)),  # inside segment 1
        (20, 40, "a, then b", (0, 13)),  # switch 33 is frame 13 of the clip
        (56, 58, "b, then c", (0, 1)),
        (30, 60, "a, then b, then c", (0, 3, 27)),
        (0, 81, "a, then b, then c", (0, 33, 57)),
        (32, 33, "a", (0,)),  # the last frame before the switch
    ],
)
def test_clip_for_spanning_switches(lo, hi, prompt, starts):
    assert clip_for(VIDEO, ABC, lo, hi) == Clip(lo, hi, prompt, starts)


def test_clip_for_with_fewer_prompts_than_segments():
    # two prompts on a three-segment layout: the second prompt continues past switch 57
    assert clip_for(VIDEO, ["a", "b"], 30, 60) == Clip(30, 60, "a, then b", (0, 3))
    assert clip_for(VIDEO, ["a", "b"], 50, 70) == Clip(50, 70, "b", (0,))
    assert clip_for(VIDEO, ["a", "b"], 60, 70) == Clip(60, 70, "b", (0,))
    assert clip_for(VIDEO, ["a"], 20, 81) == Clip(20, 81, "a", (0,))


def test_local_chunk_of_a_latent_layout():
    # the latent chunk [6, 12) decodes to video frames [21, 45), across the switch at 33
    lo, hi = wan_video_frame(6), wan_video_frame(12)
    assert (lo, hi) == (21, 45)
    assert clip_for(VIDEO, ABC, lo, hi) == Clip(21, 45, "a, then b", (0, 12))
    assert clip_for(LATENT, ABC, 6, 12) == Clip(6, 12, "a, then b", (0, 3))


@pytest.fixture(scope="module")
def tiny_wan_vae():
    """A random Wan VAE (diffusers' AutoencoderKLWan, causal, temporal stride 4), 4 latent
    channels: decodes ``[B, 4, T, 4, 4]`` to ``[B, 3, 4T - 3, 32, 32]``."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()  # fmt: skip


def _plain_decode(vae, latents):
    with torch.no_grad():
        return ((vae.decode(latents).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)


def test_local_reward_decodes_the_chunk_alone(tiny_wan_vae):
    """'chunk' (the authors'): the latent chunk [6, 12) decoded alone, 6 latent frames -> 1 + 4*5
    = 21 video frames (18 -> 69 in their runs), the switch at latent 9 at clip frame 4*3-3 = 9;
    'slice': frames [21, 45) of the whole video's decode (24 frames)."""
    vae = tiny_wan_vae
    model = VideoModel(None, None, lambda x: _plain_decode(vae, x), wan_video_frame, (4, 4, 4))
    latents = torch.randn(1, 4, 12, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = _plain_decode(vae, latents)  # the first 12 latent frames of the layout's 21
    assert whole.shape == (1, 45, 3, 32, 32)
    videos, clips = local_reward_input("chunk", model, latents, whole, LATENT, ABC, 6, 12)
    assert clips == [Clip(0, 21, "a, then b", (0, 9))]
    assert videos.shape == (1, 21, 3, 32, 32)
    torch.testing.assert_close(videos, _plain_decode(vae, latents[:, :, 6:12]))
    # the causal VAE's earlier frames change the decode: the chunk alone is not the slice
    assert not torch.allclose(videos[:, 1:], whole[:, 25:45], atol=1e-3)
    videos, clips = local_reward_input("slice", model, latents, whole, LATENT, ABC, 6, 12)
    assert videos is whole and clips == [Clip(21, 45, "a, then b", (0, 12))]
    with pytest.raises(ValueError, match="'chunk' or 'slice', got 'half'"):
        local_reward_input("half", model, latents, whole, LATENT, ABC, 6, 12)


def test_local_reward_chunk_of_the_toy_decoder_is_its_slice():
    """One latent frame per video frame (the toy): the chunk alone equals the slice."""
    from kvpo.video_model import _toy_decode

    model = VideoModel(None, None, _toy_decode, lambda f: f, (3, 4, 4))
    latents = torch.rand(3, 3, 12, 4, 4) * 2 - 1
    whole = _toy_decode(latents)
    videos, clips = local_reward_input("chunk", model, latents, whole, LATENT, ABC, 6, 12)
    assert clips == [Clip(0, 6, "a, then b", (0, 3))]
    assert torch.equal(videos, whole[:, 6:12])


def _windows(clips):
    return [(c.lo, c.hi, c.prompt, c.starts) for c in clips]


def test_global_clips_whole_segments():
    assert _windows(global_clips(VIDEO, ABC)) == [
        (0, 33, "a", (0,)), (33, 57, "b", (0,)), (57, 81, "c", (0,)),
    ]  # fmt: skip
    assert _windows(global_clips(VIDEO, ["a", "b"], 0)) == [
        (0, 33, "a", (0,)), (33, 81, "b", (0,)),
    ]  # fmt: skip
    assert _windows(global_clips(VideoLayout(93, (21, 45, 69)), ["p", "q"])) == [
        (0, 21, "p", (0,)), (21, 93, "q", (0,)),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("clip_len", "windows"),
    [
        # centres 16, 45, 69 (floor of (lo + hi) / 2); lo = centre - clip_len // 2
        (16, [(8, 24), (37, 53), (61, 77)]),
        (15, [(9, 24), (38, 53), (62, 77)]),  # odd: 15 // 2 = 7 before the centre
        # 36 (the LongLive value): segment 0 clamps at frame 0, segment 2 at the video's end
        # (81 - 36 = 45); the windows reach over the switches
        (36, [(0, 36), (27, 63), (45, 81)]),
        (81, [(0, 81), (0, 81), (0, 81)]),
        (100, [(0, 81), (0, 81), (0, 81)]),  # longer than the video: the whole video
    ],
)
def test_global_clips_centred_and_clamped(clip_len, windows):
    clips = global_clips(VIDEO, ABC, clip_len)
    assert [(c.lo, c.hi) for c in clips] == windows
    assert [c.prompt for c in clips] == ABC and all(c.starts == (0,) for c in clips)


def test_global_clips_of_the_longlive_config():
    # 585 video frames, segments [0,153) [153,297) [297,441) [441,585); centres 76, 225, 369,
    # 513; 36-frame windows start 18 frames before the centre
    layout = VideoLayout(147, (39, 75, 111)).mapped(wan_video_frame)
    clips = global_clips(layout, ["a", "b", "c", "d"], 36)
    assert [(c.lo, c.hi, c.prompt) for c in clips] == [
        (58, 94, "a"), (207, 243, "b"), (351, 387, "c"), (495, 531, "d"),
    ]  # fmt: skip
    # a 24-latent-frame layout, two prompts: segments [0, 21) and [21, 93) of 93 frames
    clips = global_clips(VideoLayout(24, (6, 12, 18)).mapped(wan_video_frame), ["p", "q"], 20)
    assert [(c.lo, c.hi) for c in clips] == [(0, 20), (47, 67)]  # centres 10 and 57


# ---------------------------------------------------------------------------- score_clips
def _videos(B=3, T=10):
    """Video b, frame t: every pixel (10 b + t) / 100."""
    values = (10 * torch.arange(B)[:, None] + torch.arange(T)[None, :]).double() / 100
    return values[:, :, None, None, None].expand(B, T, 3, 2, 2).float().contiguous()


class _Recorder:
    """Mean pixel, prompt length in characters and number of segment starts, per video."""

    def __init__(self):
        self.calls = []

    def __call__(self, videos, prompts, metadata):
        self.calls.append((tuple(videos.shape), list(prompts), metadata["segment_starts"]))
        return {
            "mean": videos.double().mean(dim=(1, 2, 3, 4)),  # fp64: returned as fp32
            "chars": torch.tensor([float(len(p)) for p in prompts]),
            "starts": torch.tensor([[float(len(s))] for s in metadata["segment_starts"]]),
        }


def _clip_lists():
    # clip 0 = frames [0, 4) (mean t 1.5), clip 1 = frames [4, 10) (mean t 6.5, two segments)
    return [
        [Clip(0, 4, "aa"), Clip(4, 10, "bbbb, then c", (0, 2))],
        [Clip(0, 4, "a"), Clip(4, 10, "b", (0,))],
        [Clip(0, 4, "aaaaaa"), Clip(4, 10, "bb", (0,))],
    ]


@pytest.mark.parametrize("batch_size", [0, 1, 2, 3, 5])
def test_score_clips_mean_over_clips(batch_size):
    reward = _Recorder()
    out = score_clips(reward, _videos(), _clip_lists(), batch_size=batch_size)
    assert set(out) == {"mean", "chars", "starts"}
    assert all(v.dtype == torch.float32 and v.shape == (3,) for v in out.values())
    # video b: ((10 b + 1.5) + (10 b + 6.5)) / 2 / 100
    torch.testing.assert_close(out["mean"], torch.tensor([0.04, 0.14, 0.24]))
    # characters: (2 + 12) / 2, (1 + 1) / 2, (6 + 2) / 2; segment starts: (1 + 2) / 2, 1, 1
    torch.testing.assert_close(out["chars"], torch.tensor([7.0, 1.0, 4.0]))
    torch.testing.assert_close(out["starts"], torch.tensor([1.5, 1.0, 1.0]))
    rows = {0: [3], 1: [1, 1, 1], 2: [2, 1], 3: [3], 5: [3]}[batch_size]
    assert [shape[0] for shape, _, _ in reward.calls] == rows * 2
    assert {shape[1] for shape, _, _ in reward.calls[: len(rows)]} == {4}  # clip 0: 4 frames
    assert {shape[1] for shape, _, _ in reward.calls[len(rows) :]} == {6}
    # each video's own prompt and clip-relative segment starts reach the reward
    assert sum((p for _, p, _ in reward.calls[len(rows) :]), []) == ["bbbb, then c", "b", "bb"]
    assert sum((s for _, _, s in reward.calls[len(rows) :]), []) == [[0, 2], [0], [0]]


def test_score_clips_passes_the_clip_frames():
    def first_frame(videos, prompts, metadata):
        return {"first": videos[:, 0, 0, 0, 0] * 100}

    clips = [[Clip(7, 9, "x")], [Clip(7, 9, "y")]]
    out = score_clips(first_frame, _videos(B=2), clips)
    torch.testing.assert_close(out["first"], torch.tensor([7.0, 17.0]))


def test_score_clips_rejects_mismatched_clips():
    videos = _videos()
    clips = _clip_lists()
    clips[2][1] = Clip(4, 9, "bb")  # video 2's clip 1 covers other frames
    with pytest.raises(ValueError, match="clip 1 covers different frames in different videos"):
        score_clips(_Recorder(), videos, clips)
    with pytest.raises(ValueError, match=r"one equally long clip list per video \(3\), got 2"):
        score_clips(_Recorder(), videos, _clip_lists()[:2])
    uneven = _clip_lists()
    uneven[1] = uneven[1][:1]
    with pytest.raises(ValueError, match="equally long clip list"):
        score_clips(_Recorder(), videos, uneven)
