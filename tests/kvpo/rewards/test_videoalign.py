"""VideoAlign scorers on a tiny random Qwen2-VL saved as the released VideoReward directory
(model_config.json, checkpoint-<step>/model.pth of a PEFT model with unmerged LoRA, 4.45 key
layout): preprocessing against hand-computed values, scores against the test's own plain forward
of the PEFT model, batch invariance, layout errors."""

import hashlib
import json

import pytest
import torch

from kvpo.rewards.qwen_inputs import grayscale, levels, patchify, resize_levels, smart_resize
from kvpo.rewards.registry import resolve_reward, score
from kvpo.rewards.videoalign import (
    DETAILED_SPECIAL_PROMPT,
    VideoAlignMQ,
    VideoAlignReward,
    frame_indices,
)
from tests.kvpo.rewards.layouts import NORM, TOKENS, model_config, write_videoreward
from tests.kvpo.rewards.tiny_qwen import chat, hand_patches, plain_hidden

# sha256 of DETAILED_PROMPT_WITH_SPECIAL_TOKEN in VideoAlign's prompt_template.py
TEMPLATE_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_videoreward(tmp_path_factory.mktemp("videoalign"))


def test_prompt_template_is_the_released_one():
    assert hashlib.sha256(DETAILED_SPECIAL_PROMPT.encode()).hexdigest() == TEMPLATE_SHA256
    assert DETAILED_SPECIAL_PROMPT.count("{text_prompt}") == 1
    assert DETAILED_SPECIAL_PROMPT.endswith("Text Alignment: <|TA_reward|>\nEND\n")


def test_frame_sampling_and_sizes_hand_computed():
    assert frame_indices(9, 16.0) == [0, 3, 5, 8]  # 9 / 16 * 2 -> at least 4 frames
    assert frame_indices(81, 16.0) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]  # 10.1 -> 10
    assert frame_indices(40, 16.0) == [0, 13, 26, 39]  # 5 -> round(2.5) * 2 = 4 (Python)
    assert frame_indices(3, 16.0) == [0, 2]  # at most the even count <= 3
    assert frame_indices(12, 16.0, num_frames=7) == [0, 2, 3, 5, 6, 8, 9, 11]  # round(3.5) * 2
    with pytest.raises(ValueError, match="at least 2 frames, got 1"):
        frame_indices(1, 16.0)
    assert smart_resize(480, 832, 100352, 200704) == (336, 588)  # above max: scaled down
    assert smart_resize(16, 16, 100352, 200704) == (336, 336)  # below min: scaled up
    assert smart_resize(336, 364, 100352, 200704) == (336, 364)  # fits: unchanged


def test_levels_grayscale_and_resize():
    assert levels(torch.tensor([0.0, 0.2, 0.5, 1.0])).tolist() == [0, 51, 128, 255]
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]).float()
    gray = grayscale(rgb.view(4, 3, 1, 1))
    assert gray[:, 0, 0, 0].tolist() == [76, 149, 29, 18]  # trunc(.2989 R + .587 G + .114 B)
    assert torch.equal(gray[:, 0], gray[:, 2])
    flat = torch.full((1, 3, 20, 30), 77.0)
    assert torch.equal(resize_levels(flat, (28, 56)), torch.full((1, 3, 28, 56), 77.0))
    noise = torch.randint(0, 256, (2, 3, 30, 40)).float()
    assert resize_levels(noise, (30, 40)) is noise
    out = resize_levels(noise, (56, 84))
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255


def test_patchify_matches_loops_and_the_image_processor():
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (4, 3, 56, 84)).float()
    patches, grid = patchify(frames)
    assert grid == (2, 4, 6) and patches.shape == (48, 3 * 2 * 14 * 14)
    torch.testing.assert_close(patches, hand_patches(frames), rtol=0, atol=1e-5)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image = frames[0].to(torch.uint8).permute(1, 2, 0).numpy()
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")
    ours, image_grid = patchify(frames[:1].expand(2, -1, -1, -1))  # an image: its frame twice
    assert ref["image_grid_thw"].tolist() == [list(image_grid)]
    torch.testing.assert_close(ours, ref["pixel_values"].float(), rtol=0, atol=1e-5)


def oracle(peft, tokenizer, video, prompt, gray=False):
    """The test's own VideoAlign score of one video ``[T, 3, 336, 336]`` (no resize needed):
    normalised (VQ, MQ, TA) by a plain forward of the PEFT model."""
    frames = (video * 255).round()
    if gray:
        frames = grayscale(frames)
    picked = frames[frame_indices(video.shape[0], 16.0)]
    pixels = hand_patches(picked)
    grid = torch.tensor([picked.shape[0] // 2, 24, 24])
    text = chat(DETAILED_SPECIAL_PROMPT.replace("{text_prompt}", prompt), "video")
    model = peft.base_model.model
    with torch.no_grad():
        hidden, ids = plain_hidden(model, tokenizer, text, "video", pixels, grid)
        at = [int((ids == tokenizer.convert_tokens_to_ids(t)).nonzero()) for t in TOKENS]
        raw = model.rm_head(hidden[at])[:, 0]
    mean = torch.tensor([NORM["VQ_mean"], NORM["MQ_mean"], NORM["TA_mean"]])
    std = torch.tensor([NORM["VQ_std"], NORM["MQ_std"], NORM["TA_std"]])
    return (raw - mean) / std


@pytest.fixture(scope="module")
def videos():
    torch.manual_seed(7)
    return torch.rand(2, 9, 3, 336, 336)


PROMPTS = ["a red circle moves left", "a blue square moves up, then it turns green"]


def test_scores_equal_a_plain_forward_of_the_released_model(released, videos):
    ckpt, base, peft, tokenizer = released
    reward = resolve_reward("videoalign", path=str(ckpt), base_model=str(base), batch_size=2)
    assert reward.names == ("videoalign", "videoalign_vq", "videoalign_mq_rgb", "videoalign_ta")
    out = score(reward, videos, PROMPTS)
    for b in range(2):
        want = oracle(peft, tokenizer, videos[b], PROMPTS[b])
        got = torch.stack([out["videoalign_vq"][b], out["videoalign_mq_rgb"][b],
                           out["videoalign_ta"][b]])  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert out["videoalign"][b].item() == pytest.approx(want.mean().item(), abs=1e-4)
    assert (out["videoalign_ta"][0] - out["videoalign_ta"][1]).abs() > 1e-3

    weighted = VideoAlignReward(backbone=reward.backbone, config=model_config(),
                                weights=(1, 0, 3))  # fmt: skip
    w = weighted(videos, PROMPTS)
    expected = (out["videoalign_vq"] + 3 * out["videoalign_ta"]) / 4
    torch.testing.assert_close(w["videoalign"], expected, rtol=1e-5, atol=1e-5)


def test_grayscale_motion_quality_and_batch_invariance(released, videos):
    ckpt, base, peft, tokenizer = released
    mq = resolve_reward("videoalign_mq", path=str(ckpt), base_model=str(base), batch_size=1)
    assert isinstance(mq, VideoAlignMQ) and mq.names == ("videoalign_mq",)
    out = score(mq, videos, PROMPTS)["videoalign_mq"]
    for b in range(2):
        want = oracle(peft, tokenizer, videos[b], PROMPTS[b], gray=True)[1]
        assert out[b].item() == pytest.approx(want.item(), abs=1e-4)
    rgb = VideoAlignReward(backbone=mq.backbone, config=model_config(), batch_size=2)
    assert (out - rgb(videos, PROMPTS)["videoalign_mq_rgb"]).abs().max() > 1e-4
    single = [VideoAlignReward(backbone=mq.backbone, config=model_config(), batch_size=1)(
        videos[b : b + 1], PROMPTS[b : b + 1]) for b in range(2)]  # fmt: skip
    both = rgb(videos, PROMPTS)
    for name in both:
        torch.testing.assert_close(torch.cat([s[name] for s in single]), both[name],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_small_frames_are_resized_and_errors_name_the_layout(released, tmp_path):
    ckpt, base, peft, tokenizer = released
    reward = VideoAlignReward(str(ckpt), base_model=str(base), batch_size=2)
    small = torch.rand(2, 5, 3, 16, 16)
    out = reward(small, PROMPTS)
    assert all(torch.isfinite(v).all() and v.shape == (2,) for v in out.values())

    with pytest.raises(FileNotFoundError, match=r"expected a directory holding \['model_config"):
        VideoAlignReward(str(base))
    with pytest.raises(
        FileNotFoundError, match=r"VideoAlign \(Qwen2-VL-2B-Instruct\) needs base_model="
    ):
        VideoAlignReward(str(ckpt))
    with pytest.raises(FileNotFoundError, match="checkpoint-7/model.pth"):
        VideoAlignReward(str(ckpt), base_model=str(base), step=7)
    broken = tmp_path / "broken"
    (broken / "checkpoint-1").mkdir(parents=True)
    (broken / "model_config.json").write_text(json.dumps(model_config(str(base))))
    state = torch.load(ckpt / "checkpoint-12" / "model.pth")
    del state["base_model.model.model.norm.weight"]
    torch.save(state, broken / "checkpoint-1" / "model.pth")
    with pytest.raises(ValueError, match="missing: language_model.norm.weight"):
        VideoAlignReward(str(broken))  # base model named in model_config.json
    (broken / "model_config.json").write_text(
        json.dumps(model_config(str(base), prompt_template_type="simple"))
    )
    with pytest.raises(ValueError, match="'data_config.prompt_template_type': 'simple'"):
        VideoAlignReward(str(broken))


@pytest.mark.gpu
def test_offload_round_trip_keeps_the_scores(released, videos):
    ckpt, base, _, _ = released
    reward = VideoAlignReward(str(ckpt), base_model=str(base), offload=True, dtype="float32")
    on_cpu = reward(videos, PROMPTS)
    on_gpu = reward(videos.cuda(), PROMPTS)
    assert next(reward.backbone.model.parameters()).device.type == "cpu"
    for name in reward.names:
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-3, atol=1e-3)
