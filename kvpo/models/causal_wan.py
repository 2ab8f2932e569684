"""The causal, cached, routable Wan transformer over diffusers' ``WanTransformer3DModel`` modules.

One forward call processes one *block* of latent frames for ``B`` rows (branches): patch
embedding, per-frame timestep modulation, ``num_layers`` transformer layers and the output head,
exactly as diffusers' ``WanTransformer3DModel.forward`` computes them, except self-attention:
each layer hands its RoPE'd queries/keys/values to a *context* (:class:`BlockContext`), which
attends over the rows' cached frames plus the block itself and may write the block's K/V into the
rows' sequences (``kvpo.models.frame_cache.PagedContext`` does this on a ``PagedKVStore`` with
``kvpo_kernels.routed_attention``). Without a context the block attends only to itself (plain
bidirectional attention: a one-block model forward).

Weights stay in the diffusers module (``model.transformer``), so diffusers/peft loading and LoRA
target the usual names (``blocks.0.attn1.to_q``, ``blocks.0.ffn.net.0.proj``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvpo.models.config import WanConfig
from kvpo.models.rope import apply_rope, frame_rope


class BlockContext(Protocol):
    """What a layer's self-attention sees besides the block: the rows' cached context."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the block's queries over the rows' context followed by the block.

        ``q, k, v: [B, L, H, D]`` (RoPE applied to q and k; the model's dtype). May store
        ``k``/``v`` as the block's cache entries for ``layer``. Returns ``[B, L, H, D]``.
        """
        ...

    @property
    def writes(self) -> bool:
        """Whether :meth:`attend` stores the block's K/V (then no layer may be recomputed)."""
        ...


@dataclass
class TextContext:
    """Cross-attention keys and values of encoded prompts, one pair per layer.

    ``keys[i], values[i]: [P, L_text, H, D]`` for ``P`` prompts, in the model's dtype. They
    depend on the cross-attention ``to_k`` / ``to_v`` weights: encode again after changing those
    (a LoRA step, switching adapters) when they carry adapters.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_prompts(self) -> int:
        return self.keys[0].shape[0]

    def select(self, index: torch.Tensor | list[int]) -> TextContext:
        """The prompts ``index`` (``[B]`` ints), one per row: a new context of ``B`` prompts."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.keys[0].device)
        return TextContext(
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
        )

    def for_rows(self, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s ``(k, v)`` for ``rows`` rows (one prompt broadcast, or one per row)."""
        k, v = self.keys[layer], self.values[layer]
        if k.shape[0] == rows:
            return k, v
        if k.shape[0] == 1:
            return k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
        raise ValueError(
            f"text context holds {k.shape[0]} prompts for {rows} rows: expected 1 or {rows} "
            "(use TextContext.select to give each row its prompt)"
        )


def cast_transformer(transformer: WanTransformer3DModel, dtype: torch.dtype):
    """Cast parameters to ``dtype`` in place, keeping diffusers' fp32 modules (time embedder,
    modulation tables, norms) in fp32 as ``from_pretrained(torch_dtype=...)`` does."""
    keep = tuple(transformer._keep_in_fp32_modules)
    for name, param in transformer.named_parameters():
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return transformer


class CausalWan(nn.Module):
    """Block-causal Wan over a diffusers ``WanTransformer3DModel`` (text-to-video).

    Args:
        transformer: the diffusers module holding every weight.
        config: its :class:`WanConfig` (shape and latent frame size).
    """

    def __init__(self, transformer: WanTransformer3DModel, config: WanConfig) -> None:
        super().__init__()
        expected = config.transformer_kwargs()
        for key, value in expected.items():
            got = transformer.config.get(key)
            got = tuple(got) if isinstance(got, list) else got
            if got != value:
                raise ValueError(f"transformer has {key}={got!r}, config says {value!r}")
        if transformer.config.get("image_dim") is not None:
            raise ValueError("image-conditioned Wan models are not supported (image_dim is set)")
        self.transformer = transformer
        self.config = config
        self.gradient_checkpointing = False

    @classmethod
    def from_config(
        cls, config: WanConfig, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> CausalWan:
        """A randomly initialised model of shape ``config`` (diffusers' initialisation)."""
        transformer = WanTransformer3DModel(**config.transformer_kwargs()).to(device)
        return cls(cast_transformer(transformer, dtype), config)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, text_embeds: torch.Tensor) -> TextContext:
        """Cross-attention K/V of ``P`` prompts.

        Args:
            text_embeds: ``[P, L_text, text_dim]`` text-encoder states (Wan: umT5, 512 tokens,
                zero-padded; no mask, as in Wan).

        Returns:
            A :class:`TextContext` (computed with grad when grad is enabled).
        """
        t = self.transformer
        if text_embeds.dim() != 3 or text_embeds.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text_embeds must be [P, L, text_dim={self.config.text_dim}], "
                f"got {tuple(text_embeds.shape)}"
            )
        context = t.condition_embedder.text_embedder(text_embeds.to(self.dtype))
        heads = self.config.num_attention_heads
        keys, values = [], []
        for block in t.blocks:
            attn = block.attn2
            keys.append(attn.norm_k(attn.to_k(context)).unflatten(2, (heads, -1)))
            values.append(attn.to_v(context).unflatten(2, (heads, -1)))
        return TextContext(keys, values)

    def time_embedding(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep embeddings per frame.

        Args:
            timestep: ``[B, F]`` flow-matching timesteps in ``[0, 1000]`` (float).

        Returns:
            ``temb: [B, F, dim]`` (head modulation) and ``modulation: [B, F, 6, dim]`` (layers),
            in the model's dtype.
        """
        emb = self.transformer.condition_embedder
        batch, frames = timestep.shape
        sinus = emb.timesteps_proj(timestep.reshape(-1))
        sinus = sinus.to(next(iter(emb.time_embedder.parameters())).dtype)
        temb = emb.time_embedder(sinus).to(self.dtype)
        modulation = emb.time_proj(emb.act_fn(temb))
        return temb.view(batch, frames, -1), modulation.view(batch, frames, 6, -1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        text: TextContext,
        start_frame: int = 0,
        context: BlockContext | None = None,
    ) -> torch.Tensor:
        """Velocity prediction for one block of frames.

        Args:
            latents: ``[B, C, F, H, W]`` noisy latents of the block (any float dtype; computed
                in the model's dtype).
            timestep: ``[B]``, ``[B, F]`` or a scalar, in ``[0, 1000]`` (``1000 * sigma``).
            text: the rows' prompts (:meth:`encode_text`), 1 or ``B`` of them.
            start_frame: absolute index of the block's first latent frame (RoPE positions).
            context: the rows' cached context (and whether to write the block's K/V); None:
                attend only within the block.

        Returns:
            ``[B, C_out, F, H, W]`` velocity ``v`` (``x0 = x_t - sigma * v``), in ``latents``'
            dtype.
        """
        hidden, temb, modulation = self._embed(latents, timestep)
        hidden = self._layers(hidden, modulation, text, start_frame, context, stop_early=False)
        return self._head(hidden, temb, latents.shape).to(latents.dtype)

    @torch.no_grad()
    def write_context(
        self,
        latents: torch.Tensor,
        text: TextContext,
        start_frame: int,
        context: BlockContext,
        timestep: torch.Tensor | float = 0.0,
    ) -> None:
        """Context pass: run the (clean) block at ``timestep`` (default 0) only to write its K/V.

        The last layer stops after its keys and values are written; no output head runs.
        """
        if not context.writes:
            raise ValueError("write_context needs a context that writes (built with write=True)")
        hidden, _, modulation = self._embed(latents, timestep)
        self._layers(hidden, modulation, text, start_frame, context, stop_early=True)

    def _embed(self, latents: torch.Tensor, timestep) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got {tuple(latents.shape)}")
        batch, channels, frames, height, width = latents.shape
        if (channels, height, width) != (cfg.in_channels, cfg.latent_height, cfg.latent_width):
            raise ValueError(
                f"latents are [B, {channels}, F, {height}, {width}], the model expects "
                f"[B, {cfg.in_channels}, F, {cfg.latent_height}, {cfg.latent_width}]"
            )
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=latents.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch)
        if timestep.dim() == 1:
            timestep = timestep[:, None].expand(batch, frames)
        if timestep.shape != (batch, frames):
            raise ValueError(
                f"timestep must be a scalar, [B={batch}] or [B={batch}, F={frames}], "
                f"got {tuple(timestep.shape)}"
            )
        hidden = self.transformer.patch_embedding(latents.to(self.dtype))
        hidden = hidden.flatten(2).transpose(1, 2).contiguous()  # [B, F * HW, dim]
        temb, modulation = self.time_embedding(timestep)
        return hidden, temb, modulation

    def _layers(self, hidden, modulation, text, start_frame, context, stop_early):
        batch, tokens, _ = hidden.shape
        frames = tokens // self.config.tokens_per_frame
        cos, sin = frame_rope(self.transformer.rope, start_frame, frames, self.config.frame_grid)
        cos, sin = cos.to(hidden.device), sin.to(hidden.device)
        use_checkpoint = (
            self.gradient_checkpointing
            and torch.is_grad_enabled()
            and not (context is not None and context.writes)
        )
        last = len(self.transformer.blocks) - 1
        for i in range(last + 1):
            text_k, text_v = text.for_rows(i, batch)
            args = (
                i,
                hidden,
                modulation,
                text_k,
                text_v,
                cos,
                sin,
                context,
                stop_early and i == last,
            )
            if use_checkpoint:
                hidden = checkpoint(self._layer, *args, use_reentrant=False)
            else:
                hidden = self._layer(*args)
        return hidden

    def _layer(self, i, x, modulation, text_k, text_v, cos, sin, context, stop_after_kv):
        """One transformer layer as diffusers' ``WanTransformerBlock`` with per-frame modulation.

        ``x: [B, N, dim]``, ``modulation: [B, F, 6, dim]`` -> ``[B, N, dim]`` (None when
        ``stop_after_kv``: the layer's K/V were written and nothing else is needed).
        """
        block = self.transformer.blocks[i]
        batch, tokens, dim = x.shape
        frames = modulation.shape[1]
        per_frame = (block.scale_shift_table.unsqueeze(0) + modulation.float()).unbind(2)
        shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, None] for m in per_frame)

        def modulate(norm, shift, scale):
            y = norm(x.float()).view(batch, frames, -1, dim) * (1 + scale) + shift
            return y.view(batch, tokens, dim).type_as(x)

        def gated(residual, update, gate):
            y = (
                residual.float().view(batch, frames, -1, dim)
                + update.view(batch, frames, -1, dim) * gate
            )
            return y.view(batch, tokens, dim).type_as(residual)

        # 1. self-attention over the context and the block
        attn, heads = block.attn1, self.config.num_attention_heads
        h = modulate(block.norm1, shift, scale)
        q = apply_rope(attn.norm_q(attn.to_q(h)).unflatten(2, (heads, -1)), cos, sin)
        k = apply_rope(attn.norm_k(attn.to_k(h)).unflatten(2, (heads, -1)), cos, sin)
        v = attn.to_v(h).unflatten(2, (heads, -1))
        if context is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        else:
            out = context.attend(i, q, k, v)
            if stop_after_kv:
                return None
        out = attn.to_out[0](out.flatten(2).type_as(q))
        x = gated(x, out, gate)

        # 2. cross-attention to the text
        attn = block.attn2
        h = block.norm2(x.float()).type_as(x)
        q = attn.norm_q(attn.to_q(h)).unflatten(2, (heads, -1))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), text_k.transpose(1, 2), text_v.transpose(1, 2)
        ).transpose(1, 2)
        x = x + attn.to_out[0](out.flatten(2).type_as(q))

        # 3. feed-forward
        h = modulate(block.norm3, c_shift, c_scale)
        return gated(x, block.ffn(h).float(), c_gate)

    def _head(self, hidden, temb, shape) -> torch.Tensor:
        t = self.transformer
        batch, _, frames, height, width = shape
        _, p_h, p_w = self.config.patch_size
        dim = hidden.shape[-1]
        shift, scale = (t.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
        y = t.norm_out(hidden.float()).view(batch, frames, -1, dim)
        y = (y * (1 + scale[:, :, None]) + shift[:, :, None]).view(batch, -1, dim)
        y = t.proj_out(y.type_as(hidden))
        rows, cols = height // p_h, width // p_w
        y = y.reshape(batch, frames, rows, cols, p_h, p_w, -1).permute(0, 6, 1, 2, 4, 3, 5)
        return y.reshape(batch, -1, frames, height, width)
