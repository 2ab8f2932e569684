"""How the branches of a group differ: KV routing, noise injection, branch initial noise.

KVPO explores by routing (docs/method.md section 2): the branches share every noise sample and
differ only in which cached frames they attend to in the routed window. The noise-based
baselines differ in their noise instead, over the frames of the *fork chunk* from the fork on
(``[fork, chunk end)``), and attend to the default (unrouted) view:

- ``kv_routing`` (default): routing only; no noise differs.
- ``noise_injection`` (the KVPO authors' baseline, their ``noise_diversity_sampling.yaml``):
  before the model call of each denoising step in ``inject_at_steps`` (1, 2, 3: every step but
  the first) of every fork-chunk block, branch ``g`` adds ``scale * eps_{g,s}`` (scale 0.2,
  absolute) to its noisy latent; the recorded input ``z`` is the perturbed one.
- ``initial_noise`` (Neighbor GRPO / AR-CoPO): branch ``g``'s initial noise of the fork-chunk
  frames is ``sqrt(1 - s^2) * eps + s * delta_g`` (``s = initial_mix``, 0.3), ``eps`` the
  group's shared noise; re-noising noise stays shared.
- ``kv_routing+noise``: routing and noise injection together.

The anchor is never perturbed (shared noise, default view). ``eps_{g,s}`` and ``delta_g`` come
from one CPU generator per branch seeded by :func:`kvpo.streaming.branch_seed` of the group's
noise seed (itself from ``(seed, step, rank)``), so a branch's perturbation does not depend on G
or on how rows are micro-batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

EXPLORATION_MODES = ("kv_routing", "noise_injection", "initial_noise", "kv_routing+noise")


@dataclass(frozen=True)
class ExplorationConfig:
    """The exploration mode and the noise baselines' constants (module docstring)."""

    mode: str = "kv_routing"
    injection_scale: float = 0.2
    inject_at_steps: tuple[int, ...] = (1, 2, 3)
    initial_mix: float = 0.3

    @property
    def routes(self) -> bool:
        """Branches attend to their routed contexts in the window."""
        return self.mode in ("kv_routing", "kv_routing+noise")

    @property
    def injects(self) -> bool:
        return self.mode in ("noise_injection", "kv_routing+noise")

    @property
    def mixes_initial(self) -> bool:
        return self.mode == "initial_noise"

    def problems(self, num_steps: int) -> list[str]:
        """What makes this configuration unusable with ``num_steps`` denoising steps."""
        out = []
        if self.mode not in EXPLORATION_MODES:
            out.append(f"exploration must be one of {EXPLORATION_MODES}, got {self.mode!r}")
        if not self.injection_scale >= 0:
            out.append(f"noise_injection_scale must be >= 0, got {self.injection_scale}")
        if not 0 <= self.initial_mix <= 1:
            out.append(f"initial_noise_mix must lie in [0, 1], got {self.initial_mix}")
        bad = [s for s in self.inject_at_steps if not 0 <= s < num_steps]
        if self.injects and bad:
            out.append(
                f"noise_inject_at_steps {list(self.inject_at_steps)} name steps outside "
                f"0..{num_steps - 1} (the sampler has {num_steps} steps)"
            )
        return out


@dataclass
class BranchNoise:
    """The G branches' noise perturbations of frames ``[lo, hi)``.

    ``initial [G, C, hi - lo, H, W]``: the branches' initial noise there (None: shared).
    ``inject {step: [G, C, hi - lo, H, W]}``: added to the noisy latent before that step's
    model call (empty: none). Row ``G`` (the anchor) and any other row index ``>= G`` is
    unperturbed.
    """

    lo: int
    hi: int
    initial: torch.Tensor | None
    inject: dict[int, torch.Tensor]

    @property
    def num_branches(self) -> int:
        tensors = [self.initial, *self.inject.values()]
        return next(t.shape[0] for t in tensors if t is not None)

    def row_noise(self, shared: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Initial noise ``[len(rows), C, T, H, W]`` of group rows ``rows`` from the shared
        ``[1, C, T, H, W]`` (frames ``0..T-1`` of the video)."""
        out = shared.expand(len(rows), *shared.shape[1:]).clone()
        if self.initial is not None:
            for i, g in enumerate(rows):
                if g < self.initial.shape[0]:
                    out[i, :, self.lo : self.hi] = self.initial[g].to(out.dtype)
        return out

    def row_inject(
        self, rows: Sequence[int], start: int, end: int
    ) -> dict[int, torch.Tensor] | None:
        """``{step: [len(rows), C, end - start, H, W]}`` of the frames ``[start, end)`` (zeros
        outside ``[lo, hi)`` and for the anchor), or None when nothing is injected there."""
        lo, hi = max(start, self.lo), min(end, self.hi)
        if not self.inject or hi <= lo:
            return None
        out = {}
        for step, eps in self.inject.items():
            part = eps.new_zeros(len(rows), eps.shape[1], end - start, *eps.shape[3:])
            for i, g in enumerate(rows):
                if g < eps.shape[0]:
                    part[i, :, lo - start : hi - start] = eps[g, :, lo - self.lo : hi - self.lo]
            out[step] = part
        return out


def branch_noise(
    config: ExplorationConfig,
    shared: torch.Tensor,
    branch_seeds: Sequence[int],
    lo: int,
    hi: int,
) -> BranchNoise | None:
    """Each branch's perturbation of frames ``[lo, hi)`` (None for ``kv_routing``).

    ``shared``: the group's initial noise ``[1, C, T, H, W]``; ``branch_seeds[g]``: branch
    ``g``'s seed. Per branch one generator draws, in this order, ``delta_g`` (initial_noise)
    and ``eps_{g,s}`` for each step of ``inject_at_steps`` (noise injection), each
    ``[C, hi - lo, H, W]`` standard normal, on the CPU.
    """
    if not (config.injects or config.mixes_initial):
        return None
    shape = (shared.shape[1], hi - lo, *shared.shape[3:])
    initial, inject = [], {s: [] for s in config.inject_at_steps} if config.injects else {}
    s = config.initial_mix
    for seed in branch_seeds:
        gen = torch.Generator().manual_seed(int(seed))
        if config.mixes_initial:
            delta = torch.randn(shape, generator=gen).to(shared.device, shared.dtype)
            initial.append(math.sqrt(1 - s * s) * shared[0, :, lo:hi] + s * delta)
        for step in inject:
            eps = torch.randn(shape, generator=gen).to(shared.device, shared.dtype)
            inject[step].append(config.injection_scale * eps)
    return BranchNoise(
        lo,
        hi,
        torch.stack(initial) if initial else None,
        {step: torch.stack(parts) for step, parts in inject.items()},
    )
