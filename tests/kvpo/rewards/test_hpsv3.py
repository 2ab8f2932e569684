"""HPSv3 on a tiny random Qwen2-VL saved as the released HPSv3.safetensors (4.45 key layout) with
its HPSv3_7B.yaml: preprocessing against hand-computed values and PIL, frame and clip scores
against the test's own plain forward, batch invariance, layout errors."""

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from kvpo.rewards.hpsv3 import INSTRUCTION, REWARD_QUESTION, HPSv3Reward, prepare_image
from kvpo.rewards.qwen_inputs import patchify, smart_resize
from kvpo.rewards.registry import resolve_reward, score
from tests.kvpo.rewards.layouts import HPSV3_YAML, write_hpsv3
from tests.kvpo.rewards.tiny_qwen import chat, hand_patches, plain_hidden

# sha256 of INSTRUCTION + prompt_with_special_token in hpsv3/dataset/data_collator_qwen.py
PROMPT_SHA256 = "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"
PROMPTS = ["a red circle moves left", "a green triangle moves up"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_hpsv3(tmp_path_factory.mktemp("hpsv3"))


@pytest.fixture(scope="module")
def videos():
    torch.manual_seed(11)
    return torch.rand(2, 4, 3, 448, 448)


def test_prompt_is_the_released_one():
    assert hashlib.sha256((INSTRUCTION + REWARD_QUESTION).encode()).hexdigest() == PROMPT_SHA256
    assert HPSv3Reward.prompt("a cat").count("Textual prompt - a cat\n") == 1


def test_image_sizes_and_resize_hand_computed():
    pixels = 256 * 28 * 28
    assert smart_resize(480, 832, pixels, pixels) == (336, 588)
    assert smart_resize(16, 16, pixels, pixels) == (448, 448)
    assert smart_resize(40, 60, pixels, pixels) == (392, 560)  # up to about 200704 pixels
    torch.manual_seed(1)
    frame = torch.randint(0, 256, (3, 40, 60)).float()
    patches, grid = prepare_image(frame, pixels)
    assert grid == (1, 28, 40)
    image = Image.fromarray(frame.to(torch.uint8).permute(1, 2, 0).numpy()).resize(
        (560, 392), Image.BICUBIC
    )
    resized = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
    torch.testing.assert_close(patches, hand_patches(torch.stack([resized, resized])))
    same = torch.randint(0, 256, (3, 448, 448)).float()
    assert torch.equal(prepare_image(same, pixels)[0], patchify(same.expand(2, -1, -1, -1))[0])


def oracle(model, tokenizer, video, prompt):
    """``[T, 2]`` (mu, sigma) of each 448 x 448 frame by the test's plain forward."""
    text = chat(INSTRUCTION.replace("{text_prompt}", prompt) + REWARD_QUESTION, "image")
    out = []
    for frame in (video * 255).round():
        pixels = hand_patches(torch.stack([frame, frame]))
        with torch.no_grad():
            hidden, ids = plain_hidden(model, tokenizer, text, "image", pixels,
                                       torch.tensor([1, 32, 32]))  # fmt: skip
            at = int((ids == tokenizer.convert_tokens_to_ids("<|Reward|>")).nonzero())
            out.append(model.rm_head(hidden[at].float()))
    return torch.stack(out)


def test_scores_equal_a_plain_forward_of_the_released_model(released, videos):
    folder, base, model, tokenizer = released
    reward = resolve_reward("video_hpsv3", path=str(folder), base_model=str(base), batch_size=3)
    frames = reward.frame_scores(videos, PROMPTS)
    assert frames.shape == (2, 4, 2)
    for b in range(2):
        want = oracle(model, tokenizer, videos[b], PROMPTS[b])
        torch.testing.assert_close(frames[b], want, rtol=1e-4, atol=1e-4)
    out = score(reward, videos, PROMPTS)
    for b in range(2):
        mus = sorted(frames[b, :, 0].tolist(), reverse=True)
        assert out["video_hpsv3"][b].item() == pytest.approx(sum(mus) / 4, abs=1e-5)
        top = max(1, math.floor(4 * 0.3))  # 1 frame of 4
        assert out["video_hpsv3_top30"][b].item() == pytest.approx(sum(mus[:top]) / top, 1e-5)
    assert (frames[:, :, 0].max() - frames[:, :, 0].min()) > 1e-4  # the frames differ


def test_batch_invariance_and_a_weights_file_path(released, videos):
    folder, base, _, _ = released
    whole = HPSv3Reward(str(folder / "HPSv3.safetensors"), base_model=str(base), batch_size=8)
    one = HPSv3Reward(backbone=whole.backbone, batch_size=1)
    torch.testing.assert_close(
        one.frame_scores(videos, PROMPTS), whole.frame_scores(videos, PROMPTS), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip
    small = whole(torch.rand(2, 3, 3, 16, 24), PROMPTS)  # resized up to 392 x 532
    assert all(torch.isfinite(v).all() for v in small.values())


def test_layout_errors_name_what_was_expected(released, tmp_path):
    folder, base, _, _ = released
    with pytest.raises(FileNotFoundError, match="expected a directory holding HPSv3.safetensors"):
        HPSv3Reward(str(base))
    with pytest.raises(
        FileNotFoundError, match=r"HPSv3 \(Qwen2-VL-7B-Instruct\) needs base_model="
    ):
        HPSv3Reward(str(folder))
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(str(folder / "HPSv3.safetensors"))
    del state["rm_head.3.bias"]
    state["visual.merger.mlp.0.weight"] = torch.zeros(3, 3)
    save_file(state, str(broken / "HPSv3.safetensors"))
    (broken / "HPSv3_7B.yaml").write_text(HPSV3_YAML)
    with pytest.raises(ValueError, match=r"shape: visual.merger.mlp.0.weight: expected \(128, 128"):
        HPSv3Reward(str(broken), base_model=str(base))
    (broken / "HPSv3_7B.yaml").write_text(HPSV3_YAML.replace('"ranknet"', '"default"'))
    with pytest.raises(ValueError, match="found {'rm_head_type': 'default'}"):
        HPSv3Reward(str(broken), base_model=str(base))


@pytest.mark.gpu
def test_offload_round_trip_keeps_the_scores(released, videos):
    folder, base, _, _ = released
    reward = HPSv3Reward(str(folder), base_model=str(base), offload=True, dtype="float32")
    on_cpu = reward(videos, PROMPTS)
    on_gpu = reward(videos.cuda(), PROMPTS)
    assert next(reward.backbone.model.parameters()).device.type == "cpu"
    for name in reward.names:
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-3, atol=1e-3)
