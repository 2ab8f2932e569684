"""Tiny random Qwen2-VL reward models written in the released layouts, and the tests' own plain
forward of them (the oracle the scorers are compared with).

The base-model directory imitates ``Qwen2-VL-*-Instruct``: ``config.json`` in the 4.45 flat
format (``rope_scaling`` mrope, ``vision_config``), a word-level tokenizer with Qwen's special
tokens, ``chat_template.json`` with Qwen2-VL's chat template. Model: hidden 32, 2 layers, a
1-block vision tower (embed 32).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
# Qwen2-VL-*-Instruct's chat_template.json
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = " ".join([
    "you are a helpful assistant system user video image quality motion text alignment visual",
    "rating please provide the of red blue green circle square triangle moves left right up",
    "down then it turns prompt textual",
]).split()  # fmt: skip
HIDDEN = 32


def chat(text: str, kind: str) -> str:
    """What Qwen2-VL's template renders for one user turn (hand-written)."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|{kind}_pad|><|vision_end|>{text}<|im_end|>\n"
            "<|im_start|>assistant\n")  # fmt: skip


def write_base_model(directory: Path) -> dict[str, int]:
    """A tiny ``Qwen2-VL-*-Instruct`` directory; returns the special tokens' ids."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                   pad_token="<|endoftext|>", eos_token="<|im_end|>")  # fmt: skip
    fast.save_pretrained(directory)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2VL_TEMPLATE}))
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL}
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "vocab_size": tok.get_vocab_size(),
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "torch_dtype": "bfloat16",
        "vision_config": {"depth": 1, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2,
                          "in_chans": 3, "hidden_size": HIDDEN, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return ids


def tiny_model(base: Path, vocab: int, head: torch.nn.Module, seed: int):
    """A random ``Qwen2VLForConditionalGeneration`` of ``base``'s config with ``vocab``
    embeddings and ``rm_head = head`` (the reward models' layout), fp32, eval mode."""
    config = Qwen2VLConfig.from_pretrained(str(base))
    config.text_config.vocab_size = vocab
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.rm_head = head
    with torch.no_grad():
        for p in model.parameters():  # larger than the init so that outputs differ visibly
            p.add_(torch.randn_like(p) * 0.05)
    return model.float().eval()


def released_layout(state: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """transformers-5 keys -> the 4.45 layout the reward checkpoints were saved in
    (``model.visual.`` -> ``visual.``, ``model.language_model.`` -> ``model.``)."""
    out = {}
    for key, value in state.items():
        rest = key.removeprefix(prefix)
        if rest.startswith("model.visual."):
            rest = rest.removeprefix("model.")
        elif rest.startswith("model.language_model."):
            rest = "model." + rest.removeprefix("model.language_model.")
        out[prefix + rest] = value.detach().clone()
    return out


def hand_patches(frames: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL patches of 8-bit frames ``[T, 3, h, w]`` by loops: for each temporal pair, 2x2
    merge block (row-major) and patch in it (row-major), the values ``[c, t, 14, 14]``."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    x = (frames / 255 - mean) / std
    rows = []
    t, _, h, w = frames.shape
    for tt in range(0, t, 2):
        for by in range(h // 28):
            for bx in range(w // 28):
                for my in range(2):
                    for mx in range(2):
                        y, xx = (2 * by + my) * 14, (2 * bx + mx) * 14
                        patch = x[tt : tt + 2, :, y : y + 14, xx : xx + 14]  # [2, 3, 14, 14]
                        rows.append(patch.permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(rows)


def plain_hidden(model, tokenizer, text: str, kind: str, pixels, grid) -> torch.Tensor:
    """``(last hidden states [L, D], input_ids [L])`` of one prompt by a plain forward of
    ``model.model`` (a ``Qwen2VLForConditionalGeneration``, LoRA layers and all): the
    pad token expanded in the text as the processor does, vision embeddings scattered into the
    pad positions, positions ``0 .. L-1`` in all three rope sections."""
    pad = f"<|{kind}_pad|>"
    n = int(grid.prod()) // 4
    ids = tokenizer(text.replace(pad, pad * n), add_special_tokens=False, return_tensors="pt")
    ids = ids["input_ids"]
    inner = model.model
    embeds = inner.language_model.embed_tokens(ids)
    vision = inner.visual(pixels, grid_thw=grid.view(1, 3)).pooler_output
    token = model.config.image_token_id if kind == "image" else model.config.video_token_id
    embeds[ids == token] = vision
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    out = inner.language_model(inputs_embeds=embeds, position_ids=positions)
    return out.last_hidden_state[0], ids[0]
