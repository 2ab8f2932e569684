"""Replay (docs/method.md section 3): branch energies under the unrouted, deployment-time context.

Each branch ``g`` is replayed from the fork snapshot with the *default* sink + window view (no
routing): the policy being scored predicts ``v_theta(z[g, b, s], t_s)`` at the recorded inputs;
between blocks the replay cache advances by a no-grad context pass on the replayed prediction
``x0 = z[g, b, S-1] - sigma_{S-1} v_theta``, noised as the rollout's context passes were (the
group's context noise, :func:`kvpo.models.sampler.context_input`; prompt switches inside the
replayed blocks are re-encoded from the replayed frames). The energy

    E(g) = sum_{b, s} w_s * mean((v_theta(z[g, b, s]) - u[g, b, s])^2)

is computed by ``kvpo_kernels.tve_energy`` in two calls: the first ``grad_steps`` steps of every
block with the autograd graph, the rest without. Branches are batched: all of ``branches`` run
as one batch of forked rows (no K/V copied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvpo.method.rollout import GroupRollout
from kvpo.models import FlowSchedule, TextContext
from kvpo.models.sampler import write_context_pass
from kvpo.streaming import StreamingGenerator
from kvpo_kernels import tve_energy


def step_weights(schedule: FlowSchedule, kind: str, floor: float = 0.0) -> torch.Tensor:
    """``w_s [S]``: ``sigma_s^2`` (``"sigma2"``: the x0-MSE form of the reference code), 1
    (``"uniform"``) or ``sigma_s^2 / max(sigma_s, floor)^2`` (``"floored"``: their
    ``log_prob_sigma_floor``, with ``tau = 2``)."""
    sigmas = schedule.sigmas().float()
    if kind == "sigma2":
        return sigmas**2
    if kind == "uniform":
        return torch.ones_like(sigmas)
    if kind == "floored":
        if not floor > 0:
            raise ValueError(f"tve_step_weight 'floored' needs a floor > 0, got {floor}")
        return sigmas**2 / sigmas.clamp(min=floor) ** 2
    raise ValueError(f"tve_step_weight must be 'sigma2', 'uniform' or 'floored', got {kind!r}")


def replay_blocks(
    stream: StreamingGenerator,
    rollout: GroupRollout,
    rows: Sequence[int],
    texts: Sequence[TextContext],
    starts: Sequence[int],
    *,
    grad: bool,
    first: Callable[[int, object], torch.Tensor],
    second: Callable[[int, object], None],
) -> None:
    """Replay blocks ``starts`` in ``rows`` (forks of ``rollout``'s snapshot; freed here) in two
    passes. First, without grad, block by block: the prompt switch's recache, MemFlow's bank
    refresh, a pinned fork of each row's cache when ``grad`` (no copy), ``first(b, view)`` -> the
    block's ``x0 [B, C, F, H, W]``, and its context pass with the group's context noise. Then
    ``second(b, view)`` on each block's pinned view, so no cache write happens between a grad
    forward and its backward (the attention saves the page pool): call ``backward`` before the
    cache is written again."""
    cache, F = stream.cache, stream.frames_per_block
    rows = list(rows)
    prefix = rollout.prefix.expand(len(rows), *rollout.prefix.shape[1:])
    ctx_noise = rollout.context_noise  # the group's context-pass noise, as in the rollout
    replayed: list[torch.Tensor] = []
    pins: list[list[int]] = []
    try:
        for b, start in enumerate(starts):
            text = stream.text_at(texts, start)
            if b > 0 and start in stream.layout.switches:
                stream.recache(rows, torch.cat([prefix, *replayed], dim=2), text, start)
            cache.bank_refresh(rows, text)  # MemFlow's bank (pinned with the view)
            if grad:
                pins.append([cache.snapshot(r) for r in rows])
            with torch.no_grad():
                x0 = first(b, cache.view(rows, start, F))
            if b + 1 < len(starts):
                eps = ctx_noise if ctx_noise is None else ctx_noise[:, :, start : start + F]
                write_context_pass(
                    stream.wan, cache, rows, x0, text, start, noise=eps,
                    sigma=stream.context_sigma, timestep=stream.context_timestep,
                )  # fmt: skip
                replayed.append(x0)
        for b, pinned in enumerate(pins):
            second(b, cache.view(pinned, starts[b], F))
    finally:
        cache.free(rows)
        for pinned in pins:
            cache.free(pinned)


def replay_energies(
    stream: StreamingGenerator,
    rollout: GroupRollout,
    texts: Sequence[TextContext],
    weights: torch.Tensor,
    *,
    branches: Sequence[int],
    grad_steps: int,
) -> torch.Tensor:
    """Energies ``E [len(branches)]`` fp32 of the current weights of ``stream``'s model.

    The first ``grad_steps`` steps of each block carry gradient when grad mode is enabled. Two
    passes: the first (no grad) runs the other steps and the context passes, pinning each block's
    cache view (a fork, no copy); the second runs the grad-carrying steps on the pinned views, so
    no cache write happens between a grad forward and its backward (the attention saves the
    page pool). Call ``backward`` before the cache is written again. ``weights: [S]`` the ``w_s``.
    """
    model, cache = stream.wan, stream.cache
    branches = list(branches)
    S = stream.schedule.num_steps
    sigmas = [float(x) for x in stream.schedule.sigmas()]
    grad = torch.is_grad_enabled() and grad_steps > 0
    rows = cache.fork(rollout.snapshot, len(branches), lean=True)
    index = torch.tensor(branches, device=rollout.z.device)
    z_all, u_all = rollout.z.index_select(0, index), rollout.u.index_select(0, index)
    starts = rollout.policy_starts
    preds: dict[tuple[int, int], torch.Tensor] = {}

    def predict(b: int, s: int, view) -> torch.Tensor:
        text = stream.text_at(texts, starts[b])
        return model(z_all[:, b * S + s], sigmas[s] * 1000.0, text, starts[b], view)

    def first(b: int, view) -> torch.Tensor:
        for s in range(grad_steps if grad else 0, S):
            preds[b, s] = predict(b, s, view)
        last = preds[b, S - 1] if (b, S - 1) in preds else predict(b, S - 1, view)
        return z_all[:, b * S + S - 1] - sigmas[S - 1] * last

    def second(b: int, view) -> None:
        for s in range(grad_steps):
            preds[b, s] = predict(b, s, view)

    replay_blocks(stream, rollout, rows, texts, starts, grad=grad, first=first, second=second)
    ordered = [
        [preds[b, s] for b in range(len(starts)) for s in range(S) if s < grad_steps],
        [preds[b, s] for b in range(len(starts)) for s in range(S) if s >= grad_steps],
    ]
    return _energy(*ordered, u_all, weights, S, grad_steps)


def _energy(grad_preds, rest_preds, u_all, weights, S, grad_steps) -> torch.Tensor:
    """Sum of the two ``tve_energy`` calls over items ordered ``k = block * S + step``."""
    blocks = u_all.shape[1] // S
    steps = torch.arange(S)
    total = torch.zeros(u_all.shape[0], dtype=torch.float32, device=u_all.device)
    for preds, chosen in ((grad_preds, steps[:grad_steps]), (rest_preds, steps[grad_steps:])):
        if not preds:
            continue
        items = torch.cat([b * S + chosen for b in range(blocks)])
        pred = torch.stack(preds, dim=1)
        target = u_all.index_select(1, items.to(u_all.device))
        w = weights[chosen].repeat(blocks).to(pred.device)
        total = total + tve_energy(pred, target, w)
    return total
