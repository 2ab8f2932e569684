"""Tiny stand-ins, on disk and in the released formats, for every file the KVPO authors'
training YAMLs name, so that their files run unchanged but for paths and sizes:

- ``generator_ckpt`` / ``lora_ckpt`` as the authors' code saves them (LongLive / MemFlow
  ``WanDiffusionWrapper.state_dict()`` under ``"generator"``; peft's
  ``get_peft_model_state_dict`` of ``configure_lora_for_model``'s model under
  ``"generator_lora"``, with the distillation run's ``"critic_lora"`` beside it), written from
  the module tree transcribed in ``tests/kvpo/models/test_lora_memflow.py``;
- a Wan2.1 directory in the diffusers layout: ``text_encoder/`` (a random 1-layer
  ``UMT5EncoderModel``), ``tokenizer/`` (word-level, umT5's ``<pad>`` / ``</s>`` / ``<unk>``, an
  ``</s>`` appended as umT5's tokenizer does) and ``vae/`` (a random ``AutoencoderKLWan`` with
  Wan's 4x temporal stride and 16 latent channels, 2 base channels);
- a prompt file in their bracket format (``4,[...],[...],[...],[...]``);
- HPSv3 (``tests/kvpo/rewards/layouts.write_hpsv3``: random Qwen2-VL, released layout) with
  ``max_pixels = min_pixels`` lowered from 200704 to 4 x 28 x 28 so a frame is 4 merged tokens.

The generator has Wan's latent frame (16 x 60 x 104, what a file checkpoint loads as) with one
128-wide head, one block and patch 1 x 15 x 26 (16 tokens per latent frame).
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch

from kvpo.models import CausalWan, WanConfig
from tests.kvpo.models.test_loading import original_state_dict
from tests.kvpo.models.test_lora_memflow import WanDiffusionWrapper
from tests.kvpo.rewards.layouts import write_hpsv3

TEXT_DIM = 32
SHAPE = WanConfig(
    patch_size=(1, 15, 26), num_attention_heads=1, attention_head_dim=128, text_dim=TEXT_DIM,
    freq_dim=32, ffn_dim=128, num_layers=1,
)  # fmt: skip
PROMPTS = [  # four segments each, as their prompt_min_segments = prompt_max_segments = 4
    ["a red circle moves left", "it turns blue", "a green square moves up", "it moves down"],
    ["a blue square moves right", "then it turns red", "a circle moves up", "it moves left"],
    ["a green triangle moves up", "it turns red", "a blue circle moves down", "it moves right"],
]
WORDS = sorted({w for seq in PROMPTS for s in seq for w in s.split()})
HPSV3_PIXELS = 4 * 28 * 28


def write_prompts(path: Path) -> Path:
    """The authors' formatted prompt file: ``count,[segment],...`` per line."""
    path.write_text("".join(f"{len(s)}," + ",".join(f"[{p}]" for p in s) + "\n" for s in PROMPTS))
    return path


def write_wan_dir(root: Path) -> Path:
    """``root/text_encoder``, ``root/tokenizer``, ``root/vae`` (module docstring)."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    umt5 = UMT5Config(
        vocab_size=len(vocab), d_model=TEXT_DIM, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
    )  # fmt: skip
    UMT5EncoderModel(umt5).eval().save_pretrained(root / "text_encoder")
    torch.manual_seed(2)
    vae = AutoencoderKLWan(
        base_dim=2, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=0, attn_scales=[],
        temperal_downsample=[True, True],
    )  # fmt: skip
    vae.eval().save_pretrained(root / "vae")
    return root


def random_generator(seed: int = 0) -> CausalWan:
    """Our model of :data:`SHAPE` with every weight perturbed (diffusers zero-inits the head)."""
    torch.manual_seed(seed)
    model = CausalWan.from_config(SHAPE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _lora(wrapper: WanDiffusionWrapper, rank: int, alpha: float, seed: int) -> dict:
    """``configure_lora_for_model`` (LongLive's and MemFlow's utils/lora_utils.py: peft on every
    ``nn.Linear`` of a ``CausalWanAttentionBlock``) with random A and B; peft's state dict."""
    targets = [
        name
        for block, module in wrapper.model.named_modules()
        if type(module).__name__ == "CausalWanAttentionBlock"
        for name, sub in module.named_modules(prefix=block)
        if isinstance(sub, torch.nn.Linear)
    ]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    lora = peft.get_peft_model(copy.deepcopy(wrapper.model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / rank**0.5 * 0.1)
    return peft.get_peft_model_state_dict(lora)


def write_checkpoints(root: Path, kind: str, rank: int, alpha: float) -> tuple[Path, Path]:
    """``(generator_ckpt, lora_ckpt)`` of a random generator as LongLive (``kind="longlive"``:
    ``longlive_base.pt``, ``lora.pt`` in fp32) or MemFlow (``"memflow"``: ``base.pt`` with
    ``"step"``, ``lora.pt`` cast to bf16 as its trainer holds it) save them."""
    wrapper = WanDiffusionWrapper(SHAPE)
    wrapper.model.load_state_dict(original_state_dict(random_generator()), strict=True)
    generator = {k: v.clone() for k, v in wrapper.state_dict().items()}  # "model.blocks.0..."
    lora = _lora(wrapper, rank, alpha, seed=3)
    critic = _lora(wrapper, rank, alpha, seed=4)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "longlive":
        base, adapter = root / "longlive_base.pt", root / "lora.pt"
        torch.save({"generator": generator}, base)
    elif kind == "memflow":
        base, adapter = root / "base.pt", root / "lora.pt"
        torch.save({"generator": generator, "step": 0}, base)
        lora = {k: v.to(torch.bfloat16) for k, v in lora.items()}
        critic = {k: v.to(torch.bfloat16) for k, v in critic.items()}
    else:
        raise ValueError(f"kind must be 'longlive' or 'memflow', got {kind!r}")
    torch.save({"generator_lora": lora, "critic_lora": critic, "step": 1000}, adapter)
    return base, adapter


def write_small_hpsv3(root: Path) -> tuple[Path, Path]:
    """``(HPSv3 dir, Qwen2-VL base dir)``: the tiny released layout at :data:`HPSV3_PIXELS`."""
    folder, base, _, _ = write_hpsv3(root)
    config = folder / "HPSv3_7B.yaml"
    lines = config.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("max_pixels:", "min_pixels:")):
            lines[i] = f"{line.split(':')[0]}: {HPSV3_PIXELS}"
    config.write_text("\n".join(lines) + "\n")
    return folder, base
