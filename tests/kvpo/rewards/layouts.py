"""Reward checkpoints written by the tests in their released layouts, from tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from tests.kvpo.rewards.tiny_qwen import HIDDEN, released_layout, tiny_model, write_base_model

TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
NORM = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
        "TA_mean": 2.8105, "TA_std": 2.5121}  # the released inference_config  # fmt: skip


def model_config(base_name="Qwen/Qwen2-VL-2B-Instruct", **data):
    return {
        "data_config": {"max_frame_pixels": 200704, "num_frames": None, "fps": 2.0,
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                        "sample_type": "uniform", **data},
        "model_config": {"model_name_or_path": base_name, "output_dim": 1,
                         "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": 4,
                             "lora_alpha": 8, "lora_dropout": 0.05, "use_rslora": False,
                             "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens",
                                                       "visual"]},
        "inference_config": NORM,
    }  # fmt: skip


def peft_reward_model(base, vocab, seed):
    head = torch.nn.Linear(HIDDEN, 1, bias=False)
    model = tiny_model(base, vocab, head, seed)
    excluded = ("lm_head", "rm_head", "embed_tokens", "visual")
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(x in n for x in excluded)]  # fmt: skip
    peft = get_peft_model(model, LoraConfig(target_modules=targets, r=4, lora_alpha=8,
                                            lora_dropout=0.05, bias="none"))  # fmt: skip
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # zero-initialised: give the merge something to do
                p.normal_(std=0.3)
    return peft.eval()


def write_videoreward(root: Path):
    """A VideoReward directory (two checkpoints) and its base model under ``root``: returns
    ``(VideoReward dir, base dir, PEFT model of the latest checkpoint, tokenizer)``."""
    base = root / "Qwen2-VL-2B-Instruct"
    write_base_model(base)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.add_special_tokens({"additional_special_tokens": TOKENS})
    ckpt = root / "VideoReward"
    for step, seed in ((3, 1), (12, 2)):  # the latest step is the one scored
        peft = peft_reward_model(base, len(tokenizer), seed)
        (ckpt / f"checkpoint-{step}").mkdir(parents=True)
        state = released_layout(peft.state_dict(), prefix="base_model.model.")
        torch.save(state, ckpt / f"checkpoint-{step}" / "model.pth")
    (ckpt / "model_config.json").write_text(json.dumps(model_config()))
    return ckpt, base, peft, tokenizer


HPSV3_YAML = """# Model Configuration
rm_head_type: "ranknet"
lora_enable: False
vision_lora: False
model_name_or_path: "Qwen/Qwen2-VL-7B-Instruct"
lora_namespan_exclude: ['lm_head', 'rm_head', 'embed_tokens']
max_pixels: 200704 # 256 * 28 * 28
min_pixels: 200704
with_instruction: true
use_special_tokens: true
reward_token: "special"
output_dim: 2
loss_type: "uncertainty"
bf16: True
torch_dtype: "bfloat16"
"""  # the released HPSv3_7B.yaml's model and data keys


def ranknet(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
        torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2),
    )  # fmt: skip


def write_hpsv3(root: Path):
    """An HPSv3 directory (HPSv3.safetensors in the 4.45 layout, HPSv3_7B.yaml) and its base
    model under ``root``: returns ``(HPSv3 dir, base dir, model, tokenizer)``."""
    from safetensors.torch import save_file

    base = root / "Qwen2-VL-7B-Instruct"
    write_base_model(base)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    model = tiny_model(base, len(tokenizer), ranknet(5), seed=6)
    folder = root / "HPSv3"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in released_layout(model.state_dict()).items()}
    save_file(state, str(folder / "HPSv3.safetensors"))
    (folder / "HPSv3_7B.yaml").write_text(HPSV3_YAML)
    return folder, base, model, tokenizer
