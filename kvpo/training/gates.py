"""Whether a policy update is taken: the protect gates of the objective (docs/method.md section 4).

The authors' two ``per_step_protect_mode`` settings (``models/longlive/trainer/kvpo.py``,
``train_step``) decide, for every epoch, whether the optimizer steps:

- ``protect_mode="skip"`` (their ``mechanism_1``): a rank where no branch beats the anchor on a
  raw reward has a zero loss (``gated_scale = 0``, :func:`kvpo.method.policy.reward_scale`); when
  *no rank* has such a branch, the update is skipped: no AdamW step (moments, step count and
  weight decay stay), no EMA update.
- ``protect_mode="gate"`` (their ``mechanism_2``): the loss is scaled by ``gated_scale``; with
  ``min_update_entropy_ratio = r > 0`` the update is skipped on every rank when on *some* rank
  the branch entropy ``H`` exceeds ``(1 - r) ln G``. ``H`` is taken over the branch slots of the
  softmax that also holds their anchor slot: with some branch beating the anchor the anchor's
  logit is ``-inf`` and ``H`` is the entropy of ``pi_theta``; without, its logit is 0 beside the
  branch log-probabilities, so each branch holds ``pi_theta(g) / 2`` and
  ``H = -sum_g (pi_g / 2) ln(pi_g / 2)``.

Both decisions are global (:func:`kvpo.training.distributed.any_rank`: whether a flag holds on
some rank), so every rank takes or skips the same update.
"""

from __future__ import annotations

import math

import torch

from kvpo.method.policy import PolicyConfig, branch_log_probs
from kvpo.training.distributed import DistInfo, any_rank

PROTECT_MODES = ("gate", "skip")


def gated_entropy(energy: torch.Tensor, beats_anchor: bool, tau: float = 2.0) -> float:
    """``H`` of the module docstring for one group: ``energy [G]`` current energies (nats)."""
    if energy.dim() != 1 or energy.numel() < 1:
        raise ValueError(f"gated_entropy needs the energies [G] of one group, got {energy.shape}")
    log_prob = branch_log_probs(energy.detach().double(), tau)
    if not beats_anchor:  # the anchor slot takes half the mass
        log_prob = log_prob - math.log(2.0)
    return float(-(log_prob.exp() * log_prob).sum())


def skip_update(
    config: PolicyConfig,
    energy: torch.Tensor,
    beats_anchor: bool,
    info: DistInfo | None = None,
) -> bool:
    """Whether this epoch's update is skipped (on every rank alike; see the module docstring).

    Args:
        config: ``protect_mode`` and ``min_update_entropy_ratio`` (and ``tau``) are read.
        energy: ``[G]`` this rank's current energies.
        beats_anchor: whether some branch of this rank beats the anchor on a raw reward.
        info: this process's rank (None: one process); with several ranks this is a collective,
            to be called on every rank alike.
    """
    info = info or DistInfo()
    if config.protect_mode == "skip":
        return not any_rank(bool(beats_anchor), info)
    if config.protect_mode != "gate":
        raise ValueError(
            f"protect_mode must be one of {PROTECT_MODES}, got {config.protect_mode!r}"
        )
    ratio, G = config.min_update_entropy_ratio, energy.shape[-1]
    if ratio <= 0 or G < 2:  # ln G = 0 never skips (theirs); the same on every rank: no collective
        return False
    high = gated_entropy(energy, beats_anchor, config.tau) > math.log(G) * (1.0 - ratio)
    return any_rank(high, info)
