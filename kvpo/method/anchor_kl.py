"""``kl_loss_mode: try_kl``: the anchor replayed under the current and the reference policy.

The KVPO authors' ``_compute_try_kl_anchor_l2`` (``models/longlive/trainer/kvpo.py``): from the
cache before the fork and the anchor's noise, the current policy and the reference each denoise
the first ``n = min(perturb_num_blocks, policy blocks)`` blocks on *their own* trajectory (the
same noise for both), and the penalty is the mean over the ``n * S`` denoising steps of the x0
MSE:

    D = 1 / (n S) * sum_{b < n, s < S} mean((x0_theta[b, s] - x0_ref[b, s])^2)

added to the objective as ``s * kl_coef * D`` (``s``: the reward-gated scale, as the discrete
KL). Only the first ``anchor_grad_steps`` steps of each block carry gradient (through the
re-noised inputs of the steps before them too); between blocks each row writes its own last x0
into its cache by a context pass without gradient.

Noise: the anchor's rollout noise (initial noise and re-noising ``xi_s`` of its frames), so that
the old policy's replay repeats the anchor exactly; the authors draw fresh Gaussian re-noising
and context noise from the global RNG (restored afterwards). The context pass is the replays'
(:func:`kvpo.method.replay.replay_energies`: the group's context noise, MemFlow's bank). The
reference's predictions are fixed for a rollout (the initial copy, or the old policy which is
only re-synced after it), so they are computed once, in :meth:`AnchorKL.reference`; the current
policy's every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpo.method.policy import reward_scale
from kvpo.method.replay import replay_blocks
from kvpo.method.rollout import GroupRollout
from kvpo.models import TextContext
from kvpo.models.lora import adapter_scope
from kvpo.streaming import StreamingGenerator, VideoNoise, group_seed


@dataclass
class AnchorReference:
    """The anchor's replayed blocks: their ``noise`` (:func:`anchor_noise`) and the reference's
    x0 predictions ``x0``: ``n S`` tensors ``[1, C, F, H, W]`` (``k = block * S + step``),
    detached."""

    noise: VideoNoise
    x0: list[torch.Tensor]


def anchor_noise(rollout: GroupRollout, noise: VideoNoise, F: int, blocks: int) -> VideoNoise:
    """The anchor's noise over its first ``blocks`` blocks after the fork (``noise [1, C, n F,
    H, W]``, ``renoise [S - 1, 1, C, n F, H, W]``)."""
    if not 1 <= blocks <= len(rollout.policy_starts):
        raise ValueError(
            f"try_kl replays 1..{len(rollout.policy_starts)} blocks (the policy window), "
            f"got {blocks}"
        )
    return VideoNoise(*noise.frames(rollout.fork, rollout.fork + blocks * F))


def anchor_predictions(
    stream: StreamingGenerator,
    rollout: GroupRollout,
    texts: Sequence[TextContext],
    noise: VideoNoise,
    *,
    grad_steps: int,
) -> list[torch.Tensor]:
    """x0 predictions (``n S`` tensors ``[1, C, F, H, W]``, ``k = block * S + step``) of the
    anchor denoised from the fork snapshot by ``stream``'s current weights, ``n`` blocks as
    ``noise`` covers.

    With grad enabled the first ``grad_steps`` steps of each block carry the autograd graph. Two
    passes (:func:`kvpo.method.replay.replay_blocks`, as the energy replays): every step and
    context pass without grad, pinning each block's cache view; then the grad-carrying steps again
    on the pinned views (same values). Call ``backward`` before the cache is written again.
    """
    model, cache, sampler = stream.wan, stream.cache, stream.sampler
    F, S = stream.frames_per_block, sampler.schedule.num_steps
    sigmas = [float(x) for x in sampler.schedule.sigmas()]
    scale = float(sampler.schedule.num_train_timesteps)
    blocks = noise.noise.shape[2] // F
    starts = [rollout.fork + b * F for b in range(blocks)]
    grad = torch.is_grad_enabled() and grad_steps > 0
    rows = cache.fork(rollout.snapshot, 1, lean=True)
    preds: dict[tuple[int, int], torch.Tensor] = {}

    def denoise(b: int, view, steps: int) -> torch.Tensor:
        text = stream.text_at(texts, starts[b])
        x = noise.noise[:, :, b * F : (b + 1) * F]
        for s in range(steps):
            v = model(x, sigmas[s] * scale, text, starts[b], view)
            preds[b, s] = x0 = x - sigmas[s] * v
            if s + 1 < S:
                xi = noise.renoise[s, :, :, b * F : (b + 1) * F]
                x = sampler.next_input(x, x0, v, sigmas[s], sigmas[s + 1], xi)
        return x0

    replay_blocks(
        stream, rollout, rows, texts, starts, grad=grad,
        first=lambda b, view: denoise(b, view, S),
        second=lambda b, view: denoise(b, view, grad_steps),
    )  # fmt: skip
    return [preds[b, s] for b in range(blocks) for s in range(S)]


def anchor_mse(current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """``D``: the mean over the terms of the fp32 mean squared difference (scalar fp32)."""
    if len(current) != len(reference) or not current:
        raise ValueError(f"need equally many terms, got {len(current)} and {len(reference)}")
    terms = [(c.float() - r.float()).pow(2).mean() for c, r in zip(current, reference)]
    return torch.stack(terms).mean()


class AnchorKL:
    """``try_kl`` for one learner's generator.

    Args:
        stream: the learner's streaming generator (its model holds the adapters).
        reference: the KL reference adapter (None: adapters disabled).
        blocks: ``perturb_num_blocks`` (capped by the policy window's blocks).
        grad_steps: ``anchor_grad_steps``.
        kl_coef, gated_scale: the objective's (``kl_coef``, ``s`` of an ungated group).
        seed: the run's seed (the group noise of ``(step, rank)`` is
            :func:`~kvpo.streaming.group_seed`'s, as in ``Learner.rollout``).
    """

    def __init__(
        self, stream, reference, *, blocks, grad_steps, kl_coef, gated_scale, seed=0
    ) -> None:
        self.stream, self.reference_adapter = stream, reference
        self.blocks, self.grad_steps = blocks, grad_steps
        self.kl_coef, self.gated_scale, self.seed = kl_coef, gated_scale, seed

    @classmethod
    def from_config(cls, cfg, stream, reference) -> AnchorKL | None:
        """The penalty of a :class:`~kvpo.training.config.TrainConfig` (None unless
        ``kl_loss_mode: try_kl`` with ``kl_coef > 0``)."""
        if cfg.kl_loss_mode != "try_kl" or cfg.kl_coef == 0:
            return None
        return cls(
            stream, reference, blocks=cfg.perturb_num_blocks, grad_steps=cfg.anchor_grad_steps,
            kl_coef=cfg.kl_coef, gated_scale=cfg.gated_scale, seed=cfg.seed,
        )  # fmt: skip

    def reference(self, rollout: GroupRollout, prompts, step: int, rank: int) -> AnchorReference:
        """The reference's replay (no grad) of the anchor of rollout ``step`` on ``rank``."""
        noise = self.stream.noise(group_seed(self.seed, step, rank))
        blocks = min(self.blocks, len(rollout.policy_starts))
        own = anchor_noise(rollout, noise, self.stream.frames_per_block, blocks)
        with torch.no_grad(), adapter_scope(self.stream.wan, self.reference_adapter):
            texts = self.stream.segment_texts(prompts)
            x0 = anchor_predictions(self.stream, rollout, texts, own, grad_steps=0)
        return AnchorReference(own, x0)

    def penalty(self, rollout: GroupRollout, prompts, ref: AnchorReference, beats_anchor):
        """``(s * kl_coef * D, D)``: the penalty with the current policy's graph, and ``D``."""
        with adapter_scope(self.stream.wan, "default"):
            texts = self.stream.segment_texts(prompts)
            current = anchor_predictions(
                self.stream, rollout, texts, ref.noise, grad_steps=self.grad_steps,
            )  # fmt: skip
        mse = anchor_mse(current, ref.x0)
        return reward_scale(beats_anchor, self.gated_scale) * self.kl_coef * mse, mse.detach()
