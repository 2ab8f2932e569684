"""Thin local-path-only wrappers of the Wan2.1 text encoder (umT5-XXL) and video VAE.

Nothing is downloaded: each wrapper loads from a local directory (``local_files_only=True``) in
the layout of the diffusers ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` repository (``text_encoder/`` +
``tokenizer/``, ``vae/``) or a directory holding one component directly. The tiny built-in
configuration does not use them: its prompts are embedded by its own small text embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_LENGTH = 512  # Wan's text context: 512 tokens, zero-padded after the prompt


def _component(root: str | Path, name: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory (local paths only; nothing is downloaded)"
        )
    sub = root / name
    return sub if (sub / "config.json").is_file() or sub.is_dir() else root


class WanTextEncoder:
    """umT5 prompt encoder: ``encode(prompts) -> [P, 512, 4096]`` embeddings.

    As Wan / diffusers' ``WanPipeline``: tokens past each prompt's length are zeroed (the model
    attends to all 512 positions without a mask).
    """

    def __init__(self, path: str | Path, dtype=torch.bfloat16, device="cpu") -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(
            str(_component(path, "tokenizer")), local_files_only=True
        )
        self.model = UMT5EncoderModel.from_pretrained(
            str(_component(path, "text_encoder")), torch_dtype=dtype, local_files_only=True
        ).to(device).eval()  # fmt: skip

    @torch.no_grad()
    def encode(self, prompts: list[str], length: int = TEXT_LENGTH) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )  # fmt: skip
        device = next(self.model.parameters()).device
        mask = tokens.attention_mask.to(device)
        states = self.model(tokens.input_ids.to(device), mask).last_hidden_state
        return states * mask[..., None].to(states.dtype)


class WanVAE:
    """Wan2.1 video VAE: ``encode(video) -> latents``, ``decode(latents) -> video``.

    ``video: [B, 3, T, H, W]`` in ``[-1, 1]``; ``latents: [B, 16, 1 + (T - 1) / 4, H / 8, W / 8]``
    normalised with the VAE's ``latents_mean`` / ``latents_std`` (the scale the generator works
    in).
    """

    def __init__(self, path: str | Path, dtype=torch.bfloat16, device="cpu") -> None:
        from diffusers import AutoencoderKLWan

        self.vae = AutoencoderKLWan.from_pretrained(
            str(_component(path, "vae")), torch_dtype=dtype, local_files_only=True
        ).to(device).eval()  # fmt: skip
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.mean = torch.tensor(cfg.latents_mean).view(shape).to(device, dtype)
        self.std = torch.tensor(cfg.latents_std).view(shape).to(device, dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(video.to(self.mean.dtype)).latent_dist
        return (dist.mean - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(latents.to(self.mean.dtype) * self.std + self.mean).sample
        return video.clamp(-1, 1)
