"""Activation bytes of the causal Wan forward (``kvpo.models.causal_wan``), per call.

One call runs ``B`` rows of one block of ``F`` frames: ``N = B x F x tokens_per_frame`` tokens,
``L = F x tokens_per_frame`` per row. ``e`` is the compute dtype's element size; ``d``, ``f``,
``H``, ``D``, ``r``: hidden size, FFN size, heads, head dim, LoRA rank; ``n_lora``: LoRA-wrapped
linears applied to video tokens (8 of the 10 default targets; ``attn2.to_k`` / ``to_v`` read
the prompt). The counts below were read off the module structure with autograd's
saved-tensor hooks, one tensor at a time, and are checked against the allocator on CPU by
``tests/kvpo/test_memory_plan.py`` (within 10%; the saved bytes match to the byte):

**Saved for backward, per layer** (no checkpointing)::

    N * (e * (9 d + 2 f + n_lora r) + 4 * (6 d + 2 H + 9))  +  B * F * 8 * d * 4

nine hidden-size tensors in the compute dtype (the inputs of the LoRA-wrapped linears, the
attention's q / k / v / outputs), six hidden-size fp32 tensors (the fp32 norm inputs and
modulated products), the FFN's GELU input and output, one ``[N, r]`` LoRA intermediate per
wrapped linear, a log-sum-exp per head for each attention and nine per-token norm statistics;
per frame the fp32 modulation table (6 x d) and two gates. Once per call: RoPE cos/sin
(``2 * L * D * 4``).

**Saved with gradient checkpointing** (``torch.utils.checkpoint``, non-reentrant): each layer
keeps only its input (``N * d * e``); the head keeps its fp32 norm input and statistics
(``N * (4 d + 8)``), the call keeps the modulation (``B * F * 6 * d * e``), the head's fp32
shift/scale (``B * F * d * 4``), RoPE cos/sin and the stashed CPU RNG state per layer.

**Transient peak without gradient** (rollout, the old / reference replays): inside a layer's
FFN, ``e * N * (3 f + 8 d)``: the base projection, the LoRA update and their sum (``3 f``), and
eight hidden-size tensors still referenced (the call's embedded input, the layer's input, the
running residual, the FFN input, the self-attention's k and v, the cross-attention's q and
output); ``7 d`` in a one-layer model; plus the per-frame fp32 table and RoPE cos/sin.

**Backward working set** of one call: the GELU's incoming and outgoing gradients, ``2 f e N``
(measured slightly lower in bf16); with checkpointing also one layer's recomputed saved tensors.

**Prompt contexts** (``encode_text``): the cross-attention K/V of each prompt,
``layers * 2 * L_text * d * e``; encoded with gradient (the current policy's replay) they also
keep the projected prompt (``L_text * d * e``) and per layer the ``to_k`` / ``to_v`` LoRA
intermediates and ``norm_k``'s fp32 input and statistics (``L_text * (2 r e + 4 d + 4)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpo.models.config import WanConfig
from kvpo.planning.components import TEXT_ONLY, lora_targets

RNG_STATE_BYTES = 5056
"""``torch.get_rng_state()``: the CPU generator state a checkpointed layer stashes."""


@dataclass(frozen=True)
class ForwardModel:
    """The activation model of one :class:`~kvpo.models.causal_wan.CausalWan` shape.

    ``element_size``: bytes per element of the compute dtype; ``rank``: LoRA rank (0: no
    adapter); ``targets``: LoRA ``target_modules`` (None: the default ten); ``text_len``: tokens
    of an encoded prompt (Wan: 512).
    """

    model: WanConfig
    element_size: int
    rank: int
    targets: tuple[str, ...] | None = None
    text_len: int = 512

    @property
    def _wrapped(self) -> list[str]:
        return lora_targets(self.model, self.targets) if self.rank else []

    @property
    def n_lora(self) -> int:
        """LoRA-wrapped linears applied to video tokens (per layer)."""
        return sum(1 for n in self._wrapped if n not in TEXT_ONLY)

    def tokens(self, rows: int, frames: int) -> int:
        return rows * frames * self.model.tokens_per_frame

    def _rope(self, frames: int) -> int:
        return 2 * frames * self.model.tokens_per_frame * self.model.attention_head_dim * 4

    def output_bytes(self, rows: int, frames: int) -> int:
        """The velocity a call returns, ``[B, C, F, H, W]`` in the latents' dtype."""
        m = self.model
        return rows * m.out_channels * frames * m.latent_height * m.latent_width * self.element_size

    def saved_per_layer(self, rows: int, frames: int) -> int:
        """Bytes one layer saves for backward (no checkpointing)."""
        m, e, n = self.model, self.element_size, self.tokens(rows, frames)
        d, f, heads = m.dim, m.ffn_dim, m.num_attention_heads
        per_token = e * (9 * d + 2 * f + self.n_lora * self.rank) + 4 * (6 * d + 2 * heads + 9)
        return n * per_token + rows * frames * 8 * d * 4

    def saved(self, rows: int, frames: int, checkpointing: bool) -> int:
        """Bytes one grad-carrying call keeps for its backward (its output not included)."""
        m, e, n = self.model, self.element_size, self.tokens(rows, frames)
        if not checkpointing:
            return m.num_layers * self.saved_per_layer(rows, frames) + self._rope(frames)
        d = m.dim
        layers = m.num_layers * (n * d * e + RNG_STATE_BYTES)
        head = n * (4 * d + 8) + rows * frames * d * 4
        return layers + head + rows * frames * 6 * d * e + self._rope(frames)

    def backward_working_set(self, rows: int, frames: int, checkpointing: bool) -> int:
        """Extra bytes while one call is back-propagated (freed as the backward proceeds)."""
        m, n = self.model, self.tokens(rows, frames)
        gelu = 2 * m.ffn_dim * self.element_size * n
        return gelu + (self.saved_per_layer(rows, frames) if checkpointing else 0)

    def nograd_peak(self, rows: int, frames: int) -> int:
        """Peak bytes a no-grad call allocates above its inputs (freed when it returns)."""
        m, e, n = self.model, self.element_size, self.tokens(rows, frames)
        lora_ffn = "ffn.net.0.proj" in self._wrapped
        hidden = 8 if m.num_layers > 1 else 7
        ffn = 3 if lora_ffn else 2
        per_frame = rows * frames * 6 * m.dim * 4
        return e * n * (ffn * m.ffn_dim + hidden * m.dim) + per_frame + self._rope(frames)

    def text_bytes(self, prompts: int, grad: bool) -> int:
        """Bytes of ``prompts`` encoded prompt contexts (and their graph when ``grad``)."""
        m, e, lt = self.model, self.element_size, self.text_len
        kv = m.num_layers * 2 * lt * m.dim * e
        if not grad:
            return prompts * kv
        text_lora = sum(1 for n in self._wrapped if n in TEXT_ONLY)
        if not text_lora:  # nothing in the prompt's path carries gradient
            return prompts * kv
        graph = lt * m.dim * e + m.num_layers * lt * (text_lora * self.rank * e + 4 * m.dim + 4)
        return prompts * (kv + graph)
