"""The global reward's transition clips (``long_reward_enable_transition``): their placement and
prompt against a plain transcription of the KVPO authors' MemFlow trainer
(``models/memflow/trainer/kvpo.py``: ``_make_clip_window``, ``_build_postfork_clip_specs``
with the global start at frame 0, ``_latent_to_pixel_frame``), their weighted global score
(``_compute_rewards_long``) on a reward written here, the configuration's checks, the
translation of the authors' files (transitions stay off), and one training step with them on."""

import re

import pytest
import torch
import yaml

from kvpo.rewards.clips import GlobalReward, VideoLayout, transition_clips
from kvpo.video_model import wan_video_frame


# ----------------------------------------------------------- the authors' code, transcribed
def their_latent_to_pixel_frame(latent_frame, stride=4):
    if latent_frame <= 0:
        return 0
    return latent_frame * stride - (stride - 1)


def their_make_clip_window(center, total_frames, clip_len):
    start = max(0, center - clip_len // 2)
    end = start + clip_len
    if end > total_frames:
        end = total_frames
        start = max(0, end - clip_len)
    return int(start), int(end)


def their_transition_specs(pixel_len, prompts_list, switch_indices, clip_len):
    """``_build_postfork_clip_specs``'s transition clips, global start 0: (start, end, prompt)."""
    specs = []
    for seg_idx, si in enumerate(switch_indices):
        pixel_switch = their_latent_to_pixel_frame(si)
        if not 0 < pixel_switch < pixel_len:
            continue
        start, end = their_make_clip_window(pixel_switch, pixel_len, clip_len)
        before = prompts_list[seg_idx]
        after = prompts_list[min(seg_idx + 1, len(prompts_list) - 1)]
        prompt = (
            f"Transition between two consecutive scenes. "
            f"First part: {before} "
            f"Second part: {after} "
            f"Judge whether the transition is visually stable and "
            f"motion is natural across the boundary."
        )
        specs.append((start, end, prompt, pixel_switch))
    return specs


def their_normal_specs(pixel_len, prompts_list, switch_indices, clip_len):
    """``_build_global_segment_clip_specs``'s segment clips: (start, end, prompt)."""
    pixels = [their_latent_to_pixel_frame(s) for s in switch_indices[: len(prompts_list) - 1]]
    bounds = [0] + [p for p in pixels if 0 < p < pixel_len] + [pixel_len]
    specs = []
    for i in range(min(len(prompts_list), len(bounds) - 1)):
        center = (bounds[i] + bounds[i + 1]) // 2
        specs.append((*their_make_clip_window(center, pixel_len, clip_len), prompts_list[i]))
    return specs


# ---------------------------------------------------------------------------- placement
PROMPTS = ["a red fox runs", "it jumps a fence", "it sleeps"]


@pytest.mark.parametrize(
    ("latents", "switches", "clip_len"),
    [
        (21, (9, 15), 36),  # 81 pixel frames, switches at 33 and 57: [15, 51), [39, 75)
        (21, (1, 18), 36),  # near the start (pixel 1: [0, 36)) and the end (69: [45, 81))
        (21, (1, 20), 12),  # pixel 1: [0, 12); pixel 77: [69, 81) clamped at the end
        (21, (9, 15), 5),  # odd length: 33 -> [31, 36)
        (21, (9, 15), 1),  # one frame: the switch frame itself
        (21, (9, 15), 100),  # longer than the video: the whole video
        (30, (3, 27), 48),  # 117 pixel frames: pixel 9 -> [0, 48), pixel 105 -> [69, 117)
    ],
)
def test_transition_clips_match_their_placement(latents, switches, clip_len):
    layout = VideoLayout(latents, switches).mapped(wan_video_frame)
    ours = transition_clips(layout, PROMPTS, clip_len)
    theirs = their_transition_specs(
        their_latent_to_pixel_frame(latents), PROMPTS, list(switches), clip_len
    )
    assert [(c.lo, c.hi, c.prompt) for c in ours] == [s[:3] for s in theirs]
    # the second part's first frame, clip-relative
    for clip, (start, _, _, pixel) in zip(ours, theirs):
        assert clip.starts == ((0, pixel - start) if pixel > start else (0,))


def test_transition_clip_windows_written_out():
    layout = VideoLayout(21, (1, 18)).mapped(wan_video_frame)  # 81 frames, switches 1 and 69
    clips = transition_clips(layout, PROMPTS, 36)
    assert [(c.lo, c.hi, c.starts) for c in clips] == [(0, 36, (0, 1)), (45, 81, (0, 24))]
    assert clips[0].prompt == (
        "Transition between two consecutive scenes. First part: a red fox runs Second part: it "
        "jumps a fence Judge whether the transition is visually stable and motion is natural "
        "across the boundary."
    )
    assert clips[1].prompt.startswith(
        "Transition between two consecutive scenes. First part: it jumps a fence Second part: "
        "it sleeps Judge"
    )


def test_transition_clips_follow_the_prompts():
    """Only switches between two of the video's prompts (as their whole-video builder reads
    ``switch_indices[:len(prompts) - 1]``); none with one prompt; none outside the video."""
    layout = VideoLayout(81, (33, 57))
    assert [(c.lo, c.hi) for c in transition_clips(layout, PROMPTS[:2], 36)] == [(15, 51)]
    assert transition_clips(layout, PROMPTS[:1], 36) == []
    assert [(c.lo, c.hi) for c in transition_clips(VideoLayout(40, (33, 57)), PROMPTS, 8)] == [
        (29, 37)
    ]
    with pytest.raises(ValueError, match="clip_len >= 1 frames, got 0"):
        transition_clips(layout, PROMPTS, 0)


# ------------------------------------------------------------------------ weighted score
def _videos(B=3, T=81):
    """Video b, frame t: every pixel sin(0.1 t + b) ** 2 (fp64 values stored in fp32)."""
    t = torch.arange(T, dtype=torch.float64)
    values = torch.sin(0.1 * t[None, :] + torch.arange(B, dtype=torch.float64)[:, None]) ** 2
    return values[:, :, None, None, None].expand(B, T, 3, 2, 2).float().contiguous()


def _reward(videos, prompts, metadata):
    return {
        "bright": videos.double().mean(dim=(1, 2, 3, 4)),
        "chars": torch.tensor([float(len(p)) for p in prompts]),
    }


def _oracle(videos, prompts, switches, normal_len, trans_len, w_n, w_t, transition=True):
    """Their _compute_rewards_long per component, fp64: the clip scores of each video, the
    normal and transition means, (w_n n + w_t t) / (w_n + w_t) with w_t = 0 without clips."""
    pixel_len = videos.shape[1]
    normal = their_normal_specs(pixel_len, prompts, switches, normal_len)
    trans = their_transition_specs(pixel_len, prompts, switches, trans_len) if transition else []
    frames = videos.double()[:, :, 0, 0, 0]  # every pixel of a frame is equal

    def means(specs):
        bright = sum(frames[:, s[0] : s[1]].mean(dim=1) for s in specs) / len(specs)
        chars = sum(len(s[2]) for s in specs) / len(specs)
        return {"bright": bright, "chars": torch.full_like(bright, chars)}

    n = means(normal)
    t = means(trans) if trans else {k: torch.zeros_like(v) for k, v in n.items()}
    w_t = w_t if trans else 0.0
    return {k: (w_n * n[k] + w_t * t[k]) / (w_n + w_t) for k in n}


@pytest.mark.parametrize(
    ("w_n", "w_t", "normal_len", "trans_len"),
    [(1.0, 0.5, 36, 36), (1.0, 0.5, 1, 12), (0.3, 2.0, 20, 48), (0.0, 1.0, 36, 36)],
)
def test_weighted_global_score(w_n, w_t, normal_len, trans_len):
    videos, switches = _videos(), [9, 15]
    layout = VideoLayout(21, tuple(switches)).mapped(wan_video_frame)
    spec = GlobalReward(normal_len, True, trans_len, w_n, w_t)
    out = spec.score(_reward, videos, layout, [PROMPTS] * 3, batch_size=2)
    expected = _oracle(videos, PROMPTS, switches, normal_len, trans_len, w_n, w_t)
    assert set(out) == {"bright", "chars"}
    for name, value in expected.items():
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name].double(), value, rtol=1e-6, atol=1e-7)
    # characters written out: the segment clips' (14 + 16 + 9) / 3 = 13, the transition clips'
    # (160 + 14 + 16 + 160 + 16 + 9) / 2 = 187.5 (the template has 160 characters)
    chars = (w_n * 13 + w_t * 187.5) / (w_n + w_t)
    assert out["chars"].tolist() == pytest.approx([chars] * 3)


def test_without_transition_clips_the_weights_divide_out():
    """One prompt (no switch inside it) or transitions off: the mean of the segment clips,
    whatever w_n > 0 (their w_t = 0); w_n = 0 then: an error (their global reward is 0)."""
    videos = _videos()
    layout = VideoLayout(21, (9, 15)).mapped(wan_video_frame)
    plain = GlobalReward(36).score(_reward, videos, layout, [PROMPTS] * 3)
    for spec, prompts in (
        (GlobalReward(36, False, 36, 0.7, 0.5), PROMPTS),
        (GlobalReward(36, True, 36, 0.7, 0.5), PROMPTS[:1]),
    ):
        out = spec.score(_reward, videos, layout, [prompts] * 3)
        expected = _oracle(videos, prompts, [9, 15], 36, 36, 0.7, 0.5, transition=False)
        for name in out:
            torch.testing.assert_close(out[name].double(), expected[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(
        GlobalReward(36, False, 36, 0.7).score(_reward, videos, layout, [PROMPTS] * 3)["bright"],
        plain["bright"],
    )
    with pytest.raises(ValueError, match="long_reward_normal_weight must be > 0 when a video"):
        GlobalReward(36, True, 36, 0.0, 1.0).score(_reward, videos, layout, [PROMPTS[:1]] * 3)


# ------------------------------------------------------------------- configuration checks
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["long_reward_normal_weight=0"], "long_reward_normal_weight must be > 0 without"),
        (["long_reward_transition_weight=-1"], "long_reward_transition_weight must be >= 0"),
        (
            ["long_reward_enable_transition=true", "long_reward_transition_clip_len=0",
             "reward_model=videoalign"],
            "long_reward_transition_clip_len must be >= 1 frame, got 0",
        ),
        (
            ["long_reward_enable_transition=true", "long_reward_normal_weight=0",
             "long_reward_transition_weight=0", "reward_model=videoalign"],
            "long_reward_normal_weight + long_reward_transition_weight must be > 0, got 0.0 + 0.0",
        ),
        (["long_reward_enable_transition=true"], "the toy reward's text alignment cannot parse"),
    ],
)  # fmt: skip
def test_config_errors(overrides, message):
    from kvpo.training.config import ConfigError
    from kvpo.training.config_parse import load_config
    from kvpo.training.validation import validate

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_config(None, overrides))


def test_global_reward_view():
    from kvpo.training.config_parse import load_config

    cfg = load_config(None, ["long_reward_enable_transition=true", "long_reward_normal_clip_len=9",
                             "long_reward_transition_clip_len=7", "long_reward_normal_weight=2",
                             "long_reward_transition_weight=0.25"])  # fmt: skip
    assert cfg.global_reward() == GlobalReward(9, True, 7, 2.0, 0.25)
    assert load_config(None, []).global_reward() == GlobalReward(0, False, 48, 1.0, 0.5)


# ------------------------------------------------------------ the authors' files: stay off
def test_authors_file_keeps_transitions_off(tmp_path, capsys):
    from pathlib import Path

    from kvpo.training.config_parse import load_config

    fixture = Path(__file__).resolve().parent / "fixtures" / "authors"
    data = yaml.safe_load((fixture / "train_kvpo_memflow.yaml").read_text())
    assert data["long_reward_enable_transition"] is False  # as their file says
    data.update(long_reward_enable_transition=True, long_reward_transition_weight=2.0,
                long_reward_transition_clip_len=12, long_reward_normal_weight=3.0)  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(path)
    err = capsys.readouterr().err
    # their trainers build no transition clips whatever the file says: off, one printed line
    assert cfg.global_reward() == GlobalReward(cfg.long_reward_normal_clip_len, False, 48, 1.0, 0.5)
    mine = [line for line in err.splitlines() if "long_reward_enable_transition: True" in line]
    assert len(mine) == 1 and "_build_global_segment_clip_specs" in mine[0]
    for key in ("long_reward_transition_weight", "long_reward_transition_clip_len",
                "long_reward_normal_weight"):  # fmt: skip
        assert any(f"{key}: " in line and "no effect here" in line for line in err.splitlines())
    # the file as they wrote it (false): nothing printed about it
    path.write_text((fixture / "train_kvpo_memflow.yaml").read_text())
    assert not load_config(path).long_reward_enable_transition
    assert "long_reward_enable_transition: " not in capsys.readouterr().err


# ------------------------------------------------------------------- one training step
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.kvpo.trainer_fixtures import tiny_generator_dir

    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def test_training_step_with_transition_clips(weights, tmp_path):
    """A step of the tiny trainer (12 frames, switch at 6; the toy VAE keeps frames) scores the
    whole segments [0, 6), [6, 12) and the transition clip [4, 8); its logged global rewards are
    (1 * mean(segments) + 0.5 * transition) / 1.5 of the rollout's videos."""
    from kvpo.training.distributed import DistInfo
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    calls = []

    def reward(videos, prompts, metadata):
        calls.append((videos.shape[1], list(prompts), metadata["segment_starts"]))
        return {
            "bright": videos.double().mean(dim=(1, 2, 3, 4)),
            "red": videos[:, :, 0].double().pow(2).mean(dim=(1, 2, 3)),
        }

    cfg = tiny_config(
        weights, tmp_path, "long_reward_enable_transition=true",
        "long_reward_transition_clip_len=4", "train_local=false",
        "reward_components=[{name: bright, weight: 1.0}, {name: red, weight: 0.5}]",
    )  # fmt: skip
    learner = build_learner(cfg, DistInfo(), reward=reward)
    assert learner.video_layout == VideoLayout(12, (6,))
    record = learner.train_step(0)
    prompts = learner.prompts.train(0, 0)
    videos = learner.last_videos.double()  # [G + 1, T, 3, H, W]
    transition = (
        f"Transition between two consecutive scenes. First part: {prompts[0]} Second part: "
        f"{prompts[1]} Judge whether the transition is visually stable and motion is natural "
        "across the boundary."
    )
    assert [c[:2] for c in calls] == [(6, [prompts[0]] * 4), (6, [prompts[1]] * 4),
                                      (4, [transition] * 4)]  # fmt: skip
    assert calls[2][2] == [[0, 2]] * 4

    def clip(lo, hi, fn):
        return fn(videos[:, lo:hi])

    for name, fn in (
        ("bright", lambda v: v.mean(dim=(1, 2, 3, 4))),
        ("red", lambda v: v[:, :, 0].pow(2).mean(dim=(1, 2, 3))),
    ):
        segments = (clip(0, 6, fn) + clip(6, 12, fn)) / 2
        expected = (1.0 * segments + 0.5 * clip(4, 8, fn)) / 1.5
        got = torch.as_tensor(record[f"reward_global/{name}/branches"]).double()
        torch.testing.assert_close(got, expected[:3], rtol=1e-5, atol=1e-7)
        assert record[f"reward_global/{name}/anchor"] == pytest.approx(expected[3].item(), 1e-5)
    assert "reward_local/bright/branches" not in record


def test_memory_planner_counts_the_transition_clip():
    """LongLive's config: the longest scored clip is the local chunk's 18 latent frames (72
    decoded frames) until a transition clip is longer; at most the whole video (4 * 147 - 3)."""
    from kvpo.models.config import WAN_1_3B
    from kvpo.planning.externals import Setup, clip_frames
    from kvpo.training.config_parse import load_config

    setup = Setup(WAN_1_3B, "bfloat16", "cuda", True, 512, "Wan2.1-T2V-1.3B")
    for on, length, frames in (("false", 1000, 72), ("true", 60, 72), ("true", 100, 100),
                               ("true", 1000, 585)):  # fmt: skip
        cfg = load_config(
            "configs/longlive.yaml",
            [f"long_reward_enable_transition={on}", f"long_reward_transition_clip_len={length}"],
        )
        assert clip_frames(cfg, setup) == frames, (on, length)
