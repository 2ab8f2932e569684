"""HPSv3 (Qwen2-VL-7B + a RankNet head): ``video_hpsv3``, each frame scored against its clip's
prompt.

As the released inference code (the ``hpsv3`` package's ``HPSv3RewardInferencer``, called per
frame by the KVPO authors' ``video_hpsv3_local``) scores an image:

- the frame as an 8-bit RGB image, resized with PIL's bicubic filter to multiples of 28 per side
  with exactly 200704 (256 x 28 x 28) pixels as closely as the aspect ratio allows (the yaml's
  ``min_pixels = max_pixels``; :func:`~kvpo.rewards.qwen_inputs.smart_resize`), rescaled,
  CLIP-normalised and patched as one image (its frame twice);
- HPSv3's instruction with the prompt, then ``Please provide the overall ratings of this image:
  <|Reward|>``, in Qwen2-VL's chat template after the image;
- the RankNet head (``hidden -> 1024 -> 16 -> 2``, ReLU, in fp32) at ``<|Reward|>`` gives
  ``(mu, sigma)``; the frame's score is ``mu``.

A clip's ``video_hpsv3`` is the mean of its frames' scores (the authors' primary reward);
``video_hpsv3_top30`` is the mean of its top ``max(1, int(0.3 T))`` frame scores (their earlier
aggregate, reported as a diagnostic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from kvpo.rewards.checkpoint import check_state, describe, load_tensors, qwen2vl_state
from kvpo.rewards.placement import resolve_dtype
from kvpo.rewards.qwen_inputs import levels, patchify, smart_resize
from kvpo.rewards.qwen_vl import (
    TOKENIZER_FILES,
    QwenBackbone,
    base_directory,
    build_backbone,
    chat_template,
    load_tokenizer,
    require_dir,
)
from kvpo.rewards.registry import register_reward

REWARD_TOKEN = "<|Reward|>"
# The hpsv3 package's dataset/data_collator_qwen.py, INSTRUCTION and prompt_with_special_token:
# the model input it was trained on, verbatim.
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text "
    "Alignment and give a overall score to estimate the human preference. Please "
    "provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions "
    "should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or "
    "logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image "
    "should be clear and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, "
    "lighting, and other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, "
    "including the color scheme, composition, atmosphere, depth of field, and the "
    "overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such "
    "as political, violent, or adult material. If such content is present, the image "
    "quality and satisfaction score should be the lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following "
    "sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image "
    "(e.g., person, animal, object) align with the textual description. The subject "
    "should match the description in terms of number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic "
    "style, evaluate how well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and "
    "surrounding elements in the image logically fit the scenario described in the "
    "prompt. The environment should support and enhance the subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt "
    "(e.g., colors, clothing, accessories, expressions, actions) are faithfully "
    "represented in the image. Minor deviations may be acceptable, but critical "
    "attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the "
    "prompt are captured in the image. The generated content should not introduce "
    "elements that conflict with or distort the original description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
REWARD_QUESTION = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
EXPECTED_YAML = {
    "rm_head_type": "ranknet",
    "output_dim": 2,
    "use_special_tokens": True,
    "reward_token": "special",
    "lora_enable": False,
}


def prepare_image(frame: torch.Tensor, pixels: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """8-bit levels ``[3, H, W]`` -> HPSv3's image patches and grid (module docstring)."""
    height, width = frame.shape[-2:]
    h, w = smart_resize(height, width, min_pixels=pixels, max_pixels=pixels)
    image = frame.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if (h, w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    levels_hw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    return patchify(levels_hw.unsqueeze(0).expand(2, -1, -1, -1))


def ranknet_head(state: Mapping[str, torch.Tensor], hidden: int, what: str) -> nn.Sequential:
    """HPSv3's ``rm_head``: ``Linear(hidden, 1024), ReLU, Dropout, Linear(1024, 16), ReLU,
    Linear(16, 2)`` in fp32, from the checkpoint's ``rm_head.*`` tensors."""
    head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05),
                         nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2))  # fmt: skip
    found = {k.removeprefix("rm_head."): v for k, v in state.items() if k.startswith("rm_head.")}
    check_state(head.state_dict(), found, f"{what} (rm_head)")
    head.load_state_dict({k: v.float() for k, v in found.items()})
    return head.float().eval().requires_grad_(False)


def _files(path: Path) -> tuple[Path, Path]:
    """``(weights, yaml)`` of a directory holding ``HPSv3.safetensors`` and ``HPSv3_7B.yaml``,
    or of the weights file with the yaml beside it."""
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "HPSv3.safetensors"
    configs = [folder / "HPSv3_7B.yaml"] if (folder / "HPSv3_7B.yaml").is_file() else sorted(
        folder.glob("*.yaml"))  # fmt: skip
    if not weights.is_file() or len(configs) != 1:
        raise FileNotFoundError(
            "HPSv3 checkpoint: expected a directory holding HPSv3.safetensors and HPSv3_7B.yaml "
            f"(or the .safetensors file with the yaml beside it), found {describe(path)}"
        )
    return weights, configs[0]


def load_hpsv3(
    path: str | Path, base_model: str | Path | None, dtype: torch.dtype, offload: bool
) -> tuple[QwenBackbone, dict]:
    """The HPSv3 backbone and head of ``path`` on the base model directory ``base_model``
    (Qwen2-VL-7B-Instruct: ``config.json``, tokenizer files; default: the yaml's
    ``model_name_or_path`` when that is a local directory). Returns ``(backbone, yaml)``."""
    weights, config_file = _files(Path(path))
    config = yaml.safe_load(config_file.read_text()) or {}
    wrong = {k: config.get(k) for k, v in EXPECTED_YAML.items() if config.get(k) != v}
    if wrong or config.get("rm_head_kwargs") is not None:
        raise ValueError(
            f"{config_file}: expected the released HPSv3 settings {EXPECTED_YAML} and no "
            f"rm_head_kwargs, found {wrong or {'rm_head_kwargs': config.get('rm_head_kwargs')}}"
        )
    named = config.get("model_name_or_path")
    base = base_directory(base_model, named, "HPSv3 (Qwen2-VL-7B-Instruct)", config_file.name)
    state = qwen2vl_state(load_tensors(weights))
    head_state = {k: state.pop(k) for k in list(state) if k.startswith("rm_head.")}
    backbone = build_backbone(base, state, dtype, f"HPSv3 weights {weights}")
    hidden = backbone.config.text_config.hidden_size
    head = ranknet_head(head_state, hidden, f"HPSv3 weights {weights}")
    tokenizer = load_tokenizer(require_dir(base, "HPSv3 tokenizer", TOKENIZER_FILES),
                               [REWARD_TOKEN])  # fmt: skip
    model = QwenBackbone(backbone, head, tokenizer, chat_template([base], tokenizer), offload)
    model.token_id(REWARD_TOKEN)  # raises unless the tokenizer and the embeddings have it
    return model, config


@register_reward("video_hpsv3")
class HPSv3Reward:
    """HPSv3 scores of clips (module docstring).

    ``__call__(videos [B, T, 3, H, W] in [0, 1], prompts)`` -> ``{"video_hpsv3",
    "video_hpsv3_top30"}``, each ``[B]`` fp32. :meth:`frame_scores` gives ``[B, T, 2]``
    ``(mu, sigma)``. Options: ``path`` (a directory with ``HPSv3.safetensors`` and
    ``HPSv3_7B.yaml``), ``base_model`` (the Qwen2-VL-7B-Instruct directory), ``batch_size``
    (frames per forward, default 4), ``offload``, ``dtype`` ("auto": bf16 on a GPU, fp32 on a
    CPU).
    """

    names = ("video_hpsv3", "video_hpsv3_top30")

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        base_model: str | Path | None = None,
        batch_size: int = 4,
        offload: bool = False,
        dtype: str | torch.dtype | None = "auto",
        backbone: QwenBackbone | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        if backbone is None:
            if path is None:
                raise ValueError(
                    "video_hpsv3 needs path= a directory with HPSv3.safetensors and "
                    "HPSv3_7B.yaml and base_model= Qwen2-VL-7B-Instruct; see docs/rewards.md"
                )
            backbone, config = load_hpsv3(path, base_model, resolve_dtype(dtype, torch.bfloat16),
                                          offload)  # fmt: skip
        self.backbone, self.batch_size = backbone, batch_size
        self.pixels = int((config or {}).get("max_pixels", 256 * 28 * 28))
        self.marker = backbone.token_id(REWARD_TOKEN)

    @staticmethod
    def prompt(text: str) -> str:
        return INSTRUCTION.replace("{text_prompt}", text) + REWARD_QUESTION

    def frame_scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, T, 2]`` fp32 ``(mu, sigma)`` of every frame against its video's prompt."""
        batch, frames = videos.shape[:2]
        prepared = [prepare_image(f, self.pixels) for f in levels(videos).flatten(0, 1)]
        texts = [self.prompt(p) for p in prompts for _ in range(frames)]
        out = self.backbone.score(
            "image", [p for p, _ in prepared], [g for _, g in prepared], texts, [self.marker],
            videos.device, self.batch_size,
        )  # fmt: skip
        return out.reshape(batch, frames, 2)

    def __call__(
        self,
        videos: torch.Tensor,
        prompts: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        mu = self.frame_scores(videos, prompts)[..., 0]
        top = max(1, int(mu.shape[1] * 0.3))
        return {
            "video_hpsv3": mu.mean(1),
            "video_hpsv3_top30": mu.topk(top, dim=1).values.mean(1),
        }
