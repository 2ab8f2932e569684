"""The KVPO policy objective on the branch simplex (docs/method.md sections 3 and 4).

A group's ``G`` branches get energies ``E [G]`` (:func:`kvpo_kernels.tve_energy`); the policy is
the softmax of ``-E / tau`` over the group. With the old policy's energies ``E_old`` (frozen
since the last sync), the reference (initial) model's ``E_ref`` and advantages ``A``:

    log rho_g = clamp(log pi_theta(g) - log pi_old(g), -20, 20)
    L = s * ( -(1/G) sum_g min(rho_g A_g, clip(rho_g, 1 - 0.1, 1 + 0.2) A_g)
              + 10 * KL(pi_theta || pi_ref) )

with the exact discrete KL over the ``G`` branches and the reward-gated scale ``s`` (1 when some
branch beats the anchor on a raw reward, see :func:`kvpo.method.advantages.any_branch_beats_anchor`,
else ``gated_scale``: 0.5, or 0 with ``protect_mode="skip"``). Whether the update is taken at all
is decided by :mod:`kvpo.method.gates`. Tensors may carry leading dims ``[..., G]`` (several
groups): per-group terms are averaged over them. Plain PyTorch: at ``G = 8`` nothing here is worth
a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PolicyConfig:
    """Hyperparameters of the objective (defaults: the authors' code)."""

    tau: float = 2.0  # logits = -E / tau
    clip_low: float = 0.1  # rho is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    log_ratio_clamp: float = 20.0  # |log rho| bound before exp
    kl_coef: float = 10.0  # weight of KL(pi_theta || pi_ref)
    gated_scale: float = 0.5  # s when no branch beats the anchor
    protect_mode: str = "gate"  # "skip": also skip the update when no rank beats the anchor
    min_update_entropy_ratio: float = 0.0  # "gate": skip when entropy > (1 - ratio) ln G


@dataclass
class PolicyLoss:
    """The loss and what to log about it.

    ``loss``: scalar, differentiable w.r.t. the current energies. ``ratio``, ``log_prob``:
    ``[..., G]`` detached. ``diagnostics``: floats, see :func:`policy_loss`.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    log_prob: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


def branch_log_probs(energy: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    """``log softmax(-E / tau)`` over the last (group) dim; ``energy [..., G]`` -> ``[..., G]``."""
    return torch.log_softmax(-energy / tau, dim=-1)


def reward_scale(beats_anchor: bool | torch.Tensor, gated_scale: float = 0.5):
    """``s``: 1 where some branch beats the anchor on a raw reward, else ``gated_scale``.

    ``beats_anchor`` is a bool (one group) or a bool tensor over the leading (group) dims.
    """
    if isinstance(beats_anchor, torch.Tensor):
        return torch.where(beats_anchor, 1.0, gated_scale)
    return 1.0 if beats_anchor else gated_scale


def _check(energy, energy_old, energy_ref, advantages) -> None:
    for name, t in (("energy_old", energy_old), ("energy_ref", energy_ref)):
        if t.shape != energy.shape:
            raise ValueError(f"{name} is {tuple(t.shape)}, energy {tuple(energy.shape)}")
    if advantages.shape != energy.shape:
        raise ValueError(f"advantages are {tuple(advantages.shape)}, energy {tuple(energy.shape)}")
    if energy.dim() < 1 or energy.shape[-1] < 1:
        raise ValueError(f"energy must be [..., G] with G >= 1, got {tuple(energy.shape)}")


def policy_loss(
    energy: torch.Tensor,
    energy_old: torch.Tensor,
    energy_ref: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beats_anchor: bool | torch.Tensor = True,
    config: PolicyConfig | None = None,
) -> PolicyLoss:
    """The clipped ratio objective with the discrete KL penalty, scaled by the reward gate.

    Args:
        energy: ``[..., G]`` (fp32|fp64) current-policy TVE energies (carries the gradient).
        energy_old: ``[..., G]`` energies of the old (rollout) policy; treated as constants.
        energy_ref: ``[..., G]`` energies of the reference (initial) model; constants.
        advantages: ``[..., G]`` per-branch advantages; constants.
        beats_anchor: whether some branch beats the anchor on a raw reward (bool, or a bool
            tensor over the leading dims), giving ``s = 1`` else ``config.gated_scale``.
        config: hyperparameters (default :class:`PolicyConfig()`).

    Returns:
        :class:`PolicyLoss` with ``diagnostics``: ``loss``, ``policy_loss`` (the clipped term),
        ``kl_ref`` (the exact KL(pi_theta || pi_ref)), ``ratio_mean|min|max``, ``clip_fraction``
        (share of branches with rho outside the clip range), ``approx_kl`` (to the old policy,
        mean over branches of ``(rho - 1) - log rho``), ``entropy`` (of pi_theta, nats), ``scale``
        (mean ``s``); means are over all groups.
    """
    _check(energy, energy_old, energy_ref, advantages)
    config = config or PolicyConfig()
    log_prob = branch_log_probs(energy, config.tau)
    log_prob_old = branch_log_probs(energy_old.detach(), config.tau)
    log_prob_ref = branch_log_probs(energy_ref.detach(), config.tau)
    advantages = advantages.detach().to(energy.dtype)

    bound = config.log_ratio_clamp
    log_ratio = (log_prob - log_prob_old).clamp(-bound, bound)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    policy_term = -surrogate.mean(-1)
    prob = torch.exp(log_prob)
    kl_ref = (prob * (log_prob - log_prob_ref)).sum(-1)
    scale = reward_scale(beats_anchor, config.gated_scale)
    loss = (scale * (policy_term + config.kl_coef * kl_ref)).mean()

    with torch.no_grad():
        outside = (ratio < 1 - config.clip_low) | (ratio > 1 + config.clip_high)
        values = {
            "loss": loss,
            "policy_loss": policy_term.mean(),
            "kl_ref": kl_ref.mean(),
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
            "clip_fraction": outside.to(energy.dtype).mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "entropy": -(prob * log_prob).sum(-1).mean(),
            "scale": torch.as_tensor(scale, dtype=energy.dtype, device=energy.device).mean(),
        }
        numbers = torch.stack([v.detach().to(energy.dtype) for v in values.values()]).tolist()
    diagnostics = dict(zip(values, numbers))
    return PolicyLoss(loss, ratio.detach(), log_prob.detach(), diagnostics)
