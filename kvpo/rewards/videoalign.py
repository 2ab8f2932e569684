"""VideoAlign / VideoReward (Qwen2-VL-2B + a linear reward head): ``videoalign`` and its
dimensions ``videoalign_vq``, ``videoalign_mq`` (grayscale frames), ``videoalign_mq_rgb``,
``videoalign_ta``.

As the released inference code scores in-memory videos (VideoAlign's ``inference.py`` with the
``process_wanvideo_tensor`` path of the KVPO authors' ``wan_inference.py``):

- frames as 8-bit levels; for ``videoalign_mq`` torchvision's grayscale of them (3 channels);
- uniform frame sampling: ``n = T / source_fps * fps`` (``fps`` from the checkpoint's
  ``model_config.json``, 2; ``source_fps`` 16, the Wan VAE's), clamped to ``[4, T]`` in steps of
  2 (Python rounding), ``indices = round(linspace(0, T - 1, n))`` (or ``num_frames`` when the
  config sets it); :func:`frame_indices`;
- each frame resized to a multiple of 28 per side with 100352 (128 x 28 x 28) to
  ``max_frame_pixels`` (200704) pixels, bicubic with antialiasing
  (:func:`~kvpo.rewards.qwen_inputs.smart_resize`, :func:`~kvpo.rewards.qwen_inputs.resize_levels`);
- the ``detailed_special`` prompt template with the clip's prompt, in Qwen2-VL's chat template
  after the video;
- the head's value at ``<|VQ_reward|>``, ``<|MQ_reward|>`` and ``<|TA_reward|>``, each
  normalised with the checkpoint's ``inference_config`` (``(x - mean) / std``).

``videoalign`` is the weighted mean ``sum_k w_k s_k / sum_k w_k`` of the three normalised scores
of one RGB forward (``weights``, default equal: the KVPO authors' mean) and returns the three as
components too (``videoalign_vq``, ``videoalign_mq_rgb``, ``videoalign_ta``): a collapse of text
alignment shows in its own curve.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvpo.rewards.checkpoint import describe, load_tensors, merge_lora, qwen2vl_state
from kvpo.rewards.placement import resolve_dtype
from kvpo.rewards.qwen_inputs import grayscale, levels, patchify, resize_levels, smart_resize
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

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28
# VideoAlign's prompt_template.py, DETAILED_PROMPT_WITH_SPECIAL_TOKEN ("detailed_special"):
# the model input it was trained on, verbatim.
DETAILED_SPECIAL_PROMPT = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct "
    "criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a "
    "rating from 0 to 10 for each of the three categories, with 0 being the worst and "
    "10 being the best. Each evaluation should be independent of the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. "
    "The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or "
    "logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image "
    "should be clear and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, "
    "lighting, and other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, "
    "including the color scheme, composition, atmosphere, depth of field, and the "
    "overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such "
    "as political, violent, or adult material. If such content is present, the image "
    "quality and satisfaction score should be the lowest possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. "
    "Consider the following sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There "
    "should be no sudden, unnatural jumps, and the video should maintain stable "
    "attributes (e.g., no fluctuating colors, textures, or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. "
    "For example, clothing should flow naturally with motion, and facial expressions "
    "should change appropriately (e.g., blinking, mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions "
    "between different motions or camera angles should be seamless, and the overall "
    "dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, "
    "clothing) blend naturally with the background, without obvious artifacts or the "
    "feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay "
    "attention to any areas where the video might have blurry or unsteady sections "
    "that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a "
    "low score for motion quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following "
    "sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video "
    "(e.g., person, animal, object) align with the textual description. The subject "
    "should match the description in terms of number, appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, "
    "facial expressions like talking or blinking) align with the described prompt. The "
    "motion should match the prompt in terms of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the "
    "prompt. This includes checking if real-world locations or scenes are accurately "
    "represented, though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic "
    "style, evaluate how well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following "
    "the subject, focus shifts) are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)


def frame_indices(total: int, source_fps: float, fps: float = 2.0, num_frames=None) -> list[int]:
    """Indices of the frames VideoAlign samples from a ``total``-frame clip (module docstring)."""
    if num_frames is not None:
        n = round(int(num_frames) / 2) * 2
    else:
        low = math.ceil(4 / 2) * 2
        high = math.floor(min(768, total) / 2) * 2
        n = round(min(max(total / source_fps * fps, low), high) / 2) * 2
    n = min(n, total)
    if not 2 <= n <= total:
        raise ValueError(f"VideoAlign needs clips of at least 2 frames, got {total}")
    return torch.linspace(0, total - 1, n).round().long().tolist()


def prepare_video(
    frames: torch.Tensor, *, source_fps: float, fps: float, num_frames, max_pixels: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """8-bit levels ``[T, 3, H, W]`` -> VideoAlign's patches and grid (module docstring)."""
    picked = frames[frame_indices(frames.shape[0], source_fps, fps, num_frames)]
    size = smart_resize(*frames.shape[-2:], min_pixels=VIDEO_MIN_PIXELS, max_pixels=max_pixels)
    return patchify(resize_levels(picked, size))


def _checkpoint_dir(root: Path, step: int | None) -> Path:
    found = {int(m.group(1)): p for p in root.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}  # fmt: skip
    if not found or (step is not None and step not in found):
        want = f"checkpoint-{step}" if step is not None else "checkpoint-<step>"
        raise FileNotFoundError(
            f"VideoAlign checkpoint: expected {root}/{want}/model.pth (the released "
            f"VideoReward directory), found {describe(root)}"
        )
    return found[step if step is not None else max(found)]


def _read_config(root: Path) -> dict:
    config = json.loads((root / "model_config.json").read_text())
    model, data = config.get("model_config", {}), config.get("data_config", {})
    expected = {
        "model_config.use_special_tokens": (model.get("use_special_tokens"), True),
        "model_config.reward_token": (model.get("reward_token"), "special"),
        "model_config.output_dim": (model.get("output_dim"), 1),
        "data_config.prompt_template_type": (data.get("prompt_template_type"), "detailed_special"),
        "data_config.sample_type": (data.get("sample_type", "uniform"), "uniform"),
    }
    wrong = {k: found for k, (found, want) in expected.items() if found != want}
    norm = config.get("inference_config") or {}
    stats = [f"{d}_{s}" for d in ("VQ", "MQ", "TA") for s in ("mean", "std")]
    if wrong or any(k not in norm for k in stats):
        raise ValueError(
            f"{root / 'model_config.json'}: expected the released VideoReward settings "
            f"{ {k: want for k, (_, want) in expected.items()} } and inference_config {stats}; "
            f"found {wrong} and inference_config keys {sorted(norm)}"
        )
    return config


def load_videoalign(
    path: str | Path, base_model: str | Path | None, dtype: torch.dtype, offload: bool,
    step: int | None = None,
) -> tuple[QwenBackbone, dict]:  # fmt: skip
    """The VideoReward backbone and head of ``path`` (a directory: ``model_config.json``,
    ``checkpoint-<step>/model.pth``, optionally ``checkpoint-<step>/tokenizer/``) on the base
    model directory ``base_model`` (Qwen2-VL-2B-Instruct: ``config.json``, tokenizer files;
    default: ``model_config.json``'s ``model_name_or_path`` when that is a local directory).
    Returns ``(backbone, model_config.json)``."""
    root = require_dir(path, "VideoAlign checkpoint (VideoReward)", ["model_config.json"])
    config = _read_config(root)
    ckpt = _checkpoint_dir(root, step)
    named = config["model_config"].get("model_name_or_path")
    what = "VideoAlign (Qwen2-VL-2B-Instruct)"
    base = base_directory(base_model, named, what, "model_config.json")
    weights = ckpt / "model.pth"
    if not weights.is_file():
        raise FileNotFoundError(f"VideoAlign weights: expected {weights}, found {describe(ckpt)}")
    lora = config.get("peft_lora_config", {})
    scale = 1.0
    if lora.get("lora_enable"):
        r, alpha = lora["lora_r"], lora["lora_alpha"]
        scale = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
    state = qwen2vl_state(merge_lora(load_tensors(weights), scale))
    head_state = {k.removeprefix("rm_head."): state.pop(k) for k in list(state)
                  if k.startswith("rm_head.")}  # fmt: skip
    if set(head_state) != {"weight"} or head_state["weight"].shape[0] != 1:
        shapes = {k: tuple(v.shape) for k, v in head_state.items()}
        raise ValueError(
            f"{weights}: expected rm_head.weight [1, hidden] (bias-free), found {shapes}"
        )
    backbone = build_backbone(base, state, dtype, f"VideoAlign weights {weights}")
    head = nn.Linear(head_state["weight"].shape[1], 1, bias=False)
    head.weight.data = head_state["weight"].to(dtype)
    tokenizer_dir = ckpt / "tokenizer"
    if not all((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        tokenizer_dir = require_dir(base, "VideoAlign tokenizer", TOKENIZER_FILES)
    tokenizer = load_tokenizer(tokenizer_dir, REWARD_TOKENS)
    template = chat_template([base, tokenizer_dir], tokenizer)
    model = QwenBackbone(backbone, head.eval().requires_grad_(False), tokenizer, template, offload)
    for token in REWARD_TOKENS:
        model.token_id(token)  # raises unless the tokenizer and the embeddings have it
    return model, config


@register_reward("videoalign")
class VideoAlignReward:
    """VideoAlign scores of clips (module docstring).

    ``__call__(videos [B, T, 3, H, W] in [0, 1], prompts)`` -> ``{name: [B] fp32}``. Options:
    ``path`` (the VideoReward directory), ``base_model`` (the Qwen2-VL-2B-Instruct directory),
    ``batch_size`` (videos per forward, default 2), ``offload``, ``dtype`` ("auto": bf16 on a
    GPU, fp32 on a CPU), ``source_fps`` (16), ``weights`` (VQ, MQ, TA weights of the overall
    score), ``step`` (a ``checkpoint-<step>``; default the latest).
    """

    names: tuple[str, ...] = ("videoalign", "videoalign_vq", "videoalign_mq_rgb", "videoalign_ta")
    grayscale = False

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        base_model: str | Path | None = None,
        batch_size: int = 2,
        offload: bool = False,
        dtype: str | torch.dtype | None = "auto",
        source_fps: float = 16.0,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        step: int | None = None,
        backbone: QwenBackbone | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        if backbone is None:
            if path is None:
                raise ValueError(
                    f"{self.names[0]} needs path= the VideoReward directory (model_config.json, "
                    "checkpoint-*/model.pth) and base_model= Qwen2-VL-2B-Instruct; see "
                    "docs/rewards.md"
                )
            dtype = resolve_dtype(dtype, torch.bfloat16)
            backbone, config = load_videoalign(path, base_model, dtype, offload, step)
        self.backbone, self.batch_size, self.source_fps = backbone, batch_size, source_fps
        data = dict(config["data_config"])
        self.fps, self.num_frames = float(data.get("fps", 2.0)), data.get("num_frames")
        self.max_pixels = int(data.get("max_frame_pixels", 200704))
        norm = config["inference_config"]
        self.mean = torch.tensor([norm[f"{d}_mean"] for d in ("VQ", "MQ", "TA")])
        self.std = torch.tensor([norm[f"{d}_std"] for d in ("VQ", "MQ", "TA")])
        self.weights = torch.tensor([float(w) for w in weights])
        if self.weights.shape != (3,) or float(self.weights.sum()) == 0:
            raise ValueError(f"weights must be three numbers (VQ, MQ, TA) with a nonzero sum, "
                             f"got {list(weights)}")  # fmt: skip
        self.markers = [backbone.token_id(t) for t in REWARD_TOKENS]

    def prompt(self, text: str) -> str:
        return DETAILED_SPECIAL_PROMPT.replace("{text_prompt}", text)

    def scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised ``[B, 3]`` fp32 (VQ, MQ, TA) of ``videos [B, T, 3, H, W]`` in [0, 1]."""
        frames = levels(videos)
        if self.grayscale:
            frames = grayscale(frames)
        prepared = [
            prepare_video(v, source_fps=self.source_fps, fps=self.fps,
                          num_frames=self.num_frames, max_pixels=self.max_pixels)
            for v in frames
        ]  # fmt: skip
        raw = self.backbone.score(
            "video", [p for p, _ in prepared], [g for _, g in prepared],
            [self.prompt(p) for p in prompts], self.markers, videos.device, self.batch_size,
        ).squeeze(-1)  # fmt: skip
        return (raw - self.mean.to(raw.device)) / self.std.to(raw.device)

    def __call__(
        self,
        videos: torch.Tensor,
        prompts: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        s = self.scores(videos, prompts)
        w = self.weights.to(s.device)
        overall = (s * w).sum(1) / w.sum()
        values = {"videoalign": overall, "videoalign_vq": s[:, 0], "videoalign_mq_rgb": s[:, 1],
                  "videoalign_ta": s[:, 2], "videoalign_mq": s[:, 1]}  # fmt: skip
        return {name: values[name].float() for name in self.names}


@register_reward("videoalign_vq")
class VideoAlignVQ(VideoAlignReward):
    """Visual quality alone (normalised)."""

    names = ("videoalign_vq",)


@register_reward("videoalign_mq")
class VideoAlignMQ(VideoAlignReward):
    """Motion quality of the grayscale frames (normalised), as the KVPO authors score it."""

    names = ("videoalign_mq",)
    grayscale = True


@register_reward("videoalign_mq_rgb")
class VideoAlignMQRGB(VideoAlignReward):
    """Motion quality of the colour frames (normalised)."""

    names = ("videoalign_mq_rgb",)


@register_reward("videoalign_ta")
class VideoAlignTA(VideoAlignReward):
    """Text alignment alone (normalised)."""

    names = ("videoalign_ta",)
