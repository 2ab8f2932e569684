"""Independent references for the causal model tests: diffusers' own ``WanTransformer3DModel``
forward over a whole sequence, with self-attention restricted by an explicit boolean mask (SDPA)
and per-token timesteps, optionally recording each layer's RoPE'd keys and values."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from kvpo.models import CausalWan, tiny_config


def small_config(**overrides):
    """2 layers, 2 heads x 32, 16x16 latent frames of 3 channels -> 16 tokens per frame."""
    return tiny_config(latent_height=16, latent_width=16, **overrides)


def random_model(config=None, seed: int = 0) -> CausalWan:
    torch.manual_seed(seed)
    model = CausalWan.from_config(config or small_config())
    with torch.no_grad():  # diffusers' init leaves some tables tiny; make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def plain_qkv(attn, hidden: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """A Wan self-attention's queries, keys and values, written out: ``q, k, v: [B, N, H, D]``
    of ``hidden [B, N, dim]``, ``q`` and ``k`` RMS-normed and rotated by ``rotary_emb = (cos,
    sin)`` (each ``[1, N, 1, D]``, its entries in equal pairs: the pair ``(2i, 2i + 1)`` of
    ``q`` and ``k`` rotated by the angle at ``2i``)."""
    heads = attn.heads
    q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (heads, -1))
    k = attn.norm_k(attn.to_k(hidden)).unflatten(2, (heads, -1))
    v = attn.to_v(hidden).unflatten(2, (heads, -1))
    cos, sin = rotary_emb[0][..., 0::2], rotary_emb[1][..., 1::2]

    def rope(x):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        return out

    return rope(q), rope(k), v


class _MaskedProcessor(WanAttnProcessor):
    """diffusers' processor with a fixed self-attention mask; records keys/values if asked."""

    def __init__(self, mask: torch.Tensor, record: list | None) -> None:
        super().__init__()
        self.mask, self.record = mask, record

    def __call__(
        self, attn, hidden, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        if self.record is not None:
            _, key, value = plain_qkv(attn, hidden, rotary_emb)
            self.record.append((key.detach(), value.detach()))
        return super().__call__(attn, hidden, None, self.mask, rotary_emb)


@torch.no_grad()
def masked_forward(
    model: CausalWan,
    latents: torch.Tensor,
    frame_timesteps: torch.Tensor,
    text_embeds: torch.Tensor,
    attends: Callable[[int], list[int]],
    record: bool = False,
):
    """diffusers forward of a whole sequence where frame ``q``'s tokens attend to the tokens of
    the frames ``attends(q)``.

    Args:
        latents: ``[B, C, F, H, W]``; frame_timesteps: ``[B, F]``; text_embeds ``[B, L, text_dim]``.

    Returns:
        The output ``[B, C, F, H, W]``, and with ``record`` a list per layer of ``(k, v)``
        ``[B, F * tokens_per_frame, H, D]`` (keys after RoPE).
    """
    transformer = model.transformer
    frames, per_frame = latents.shape[2], model.config.tokens_per_frame
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for q in range(frames):
        allowed[q, attends(q)] = True
    mask = allowed.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
    records: list | None = [] if record else None
    saved = [block.attn1.processor for block in transformer.blocks]
    try:
        for block in transformer.blocks:
            block.attn1.set_processor(_MaskedProcessor(mask, records))
        timestep = frame_timesteps.repeat_interleave(per_frame, dim=1)
        out = transformer(latents, timestep, text_embeds, return_dict=False)[0]
    finally:
        for block, processor in zip(transformer.blocks, saved):
            block.attn1.set_processor(processor)
    return (out, records) if record else out


def block_of(frame: int, frames_per_block: int) -> list[int]:
    start = frame - frame % frames_per_block
    return list(range(start, start + frames_per_block))
