"""Few-step sampling of causal Wan models: the shifted flow-matching schedule and the block loop.

Flow matching: ``x_t = (1 - sigma) x0 + sigma * eps``, the model predicts the velocity
``v = eps - x0`` at timestep ``1000 * sigma``, so ``x0_hat = x_t - sigma * v``.

Schedule (Self-Forcing / LongLive): denoising steps ``[1000, 750, 500, 250]`` warped by the time
shift 5, ``sigma = shift * s / (1 + (shift - 1) * s)`` with ``s = step / 1000``, give
``t = [1000, 937.5, 833.3, 625]``.

Two update rules between steps ``s`` and ``s + 1``:

- ``"x0"`` (the distilled models): ``x_{s+1} = (1 - sigma_{s+1}) x0_hat + sigma_{s+1} xi_s`` with
  caller-supplied noise ``xi_s``;
- ``"euler"``: the plain ODE step ``x_{s+1} = x_s + (sigma_{s+1} - sigma_s) v``.

After the last step the block's ``x0_hat`` is its output; :func:`generate` then runs the context
pass (the block at the context timestep, 0) that writes its K/V into the rows' caches. Its input
is ``(1 - sigma_c) x0_hat + sigma_c * eps`` with the caller's noise ``eps`` (the authors' run:
``sigma_c = 0.00498``, :meth:`FlowSchedule.table_sigma`) or the clean ``x0_hat``.

Optional, for exploration baselines and measurements (off by default): ``inject`` adds a given
perturbation to the noisy latent before chosen steps' model calls (the recorded input is the
perturbed one), and ``context_hook`` wraps the read-only view each block's denoising steps
attend through (e.g. to observe the attention without changing it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvpo.models.causal_wan import CausalWan, TextContext
from kvpo.models.frame_cache import FrameCache
from kvpo.models.prompt_switch import recache

UPDATE_RULES = ("x0", "euler")


@dataclass(frozen=True)
class FlowSchedule:
    """The few-step timesteps.

    Args:
        denoising_steps: raw steps in ``(0, num_train_timesteps]``, descending.
        shift: flow-matching time shift (1 = none).
        num_train_timesteps: the scale of ``t`` (1000).
        warp: apply the shift to the steps (Self-Forcing's ``warp_denoising_step``).
    """

    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    warp: bool = True

    def __post_init__(self) -> None:
        steps = [float(s) for s in self.denoising_steps]
        if not steps or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"denoising_steps must be non-empty and descending, got {steps}")
        if steps[-1] <= 0 or steps[0] > self.num_train_timesteps:
            raise ValueError(
                f"denoising_steps must lie in (0, {self.num_train_timesteps}], got {steps}"
            )
        object.__setattr__(self, "denoising_steps", tuple(steps))

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)

    def sigmas(self) -> torch.Tensor:
        """``[S]`` float64 noise levels of the steps."""
        s = torch.tensor(self.denoising_steps, dtype=torch.float64) / self.num_train_timesteps
        if self.warp:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        return s

    def timesteps(self) -> torch.Tensor:
        """``[S]`` float64 model timesteps ``num_train_timesteps * sigma``."""
        return self.sigmas() * self.num_train_timesteps

    def table_sigma(self, timestep: float) -> float:
        """The noise level the authors' ``FlowMatchScheduler.add_noise`` uses at ``timestep``.

        Their table (``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)``,
        ``set_timesteps(num_train_timesteps)``, models/longlive/utils/scheduler.py):
        ``s = linspace(1, 0, N + 1)[:-1]``, ``sigma = shift * s / (1 + (shift - 1) * s)``,
        timesteps ``N * sigma``; the entry of the nearest timestep is used (timestep 0 ->
        4.98, sigma 0.00498 at shift 5).
        """
        n = self.num_train_timesteps
        s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        table = self.shift * s / (1 + (self.shift - 1) * s)
        return float(table[torch.argmin((table * n - float(timestep)).abs())])


@dataclass
class Trajectory:
    """One block's denoising record: ``z[s]`` the noisy input of step ``s`` and ``v[s]`` the
    model's velocity there, each ``[S, B, C, F, H, W]``; ``sigmas: [S]``.
    ``x0[s] = z[s] - sigmas[s] * v[s]``."""

    z: torch.Tensor
    v: torch.Tensor
    sigmas: torch.Tensor

    def x0(self) -> torch.Tensor:
        sig = self.sigmas.to(self.z.dtype).view(-1, *([1] * (self.z.dim() - 1)))
        return self.z - sig * self.v


class FewStepSampler:
    """Denoises one block in ``schedule.num_steps`` model calls.

    Args:
        schedule: :class:`FlowSchedule`.
        rule: ``"x0"`` (re-noise the x0 prediction; needs ``renoise``) or ``"euler"``.
    """

    def __init__(self, schedule: FlowSchedule | None = None, rule: str = "x0") -> None:
        if rule not in UPDATE_RULES:
            raise ValueError(f"rule must be one of {UPDATE_RULES}, got {rule!r}")
        self.schedule = schedule or FlowSchedule()
        self.rule = rule

    def denoise_block(
        self,
        model: CausalWan,
        noise: torch.Tensor,
        text: TextContext,
        start_frame: int,
        context=None,
        renoise: torch.Tensor | None = None,
        record: bool = False,
        inject: Mapping[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Trajectory | None]:
        """Sample one block.

        Args:
            noise: ``[B, C, F, H, W]`` the block's initial noise (``sigma = 1`` at step 1000).
            text, start_frame, context: as for ``CausalWan.forward`` (the context is read only).
            renoise: ``[S - 1, B | 1, C, F, H, W]`` the re-noising noise ``xi_s`` (rule ``"x0"``).
            record: also return the :class:`Trajectory`.
            inject: ``{step: [B | 1, C, F, H, W]}`` added to the noisy latent before that step's
                model call (None: nothing added).

        Returns:
            ``x0_hat: [B, C, F, H, W]`` (``noise``'s dtype) and the trajectory or None.
        """
        sigmas = self.schedule.sigmas()
        steps = len(sigmas)
        if self.rule == "x0" and steps > 1:
            expected = (steps - 1, noise.shape[1], *noise.shape[2:])
            if (
                renoise is None
                or renoise.dim() != 6
                or (renoise.shape[0], *renoise.shape[2:]) != expected
            ):
                got = None if renoise is None else tuple(renoise.shape)
                raise ValueError(
                    f"rule 'x0' needs renoise [S-1={steps - 1}, B|1, {noise.shape[1]}, "
                    f"{', '.join(map(str, noise.shape[2:]))}], got {got}"
                )
        x, zs, vs = noise, [], []
        for s in range(steps):
            sigma = float(sigmas[s])
            if inject is not None and s in inject:
                x = x + inject[s].to(x.dtype)
            v = model(x, sigma * self.schedule.num_train_timesteps, text, start_frame, context)
            if record:
                zs.append(x)
                vs.append(v)
            x0 = x - sigma * v
            if s + 1 < steps:
                xi = renoise[s] if self.rule == "x0" else None
                x = self.next_input(x, x0, v, sigma, float(sigmas[s + 1]), xi)
        trajectory = None
        if record:
            trajectory = Trajectory(torch.stack(zs), torch.stack(vs), sigmas.to(noise.dtype))
        return x0, trajectory

    def next_input(self, x, x0, v, sigma: float, nxt: float, xi) -> torch.Tensor:
        """The input of the step at ``nxt`` after the step at ``sigma`` gave velocity ``v``
        (``x0 = x - sigma v``): rule ``"x0"`` re-noises ``x0`` with ``xi``, ``"euler"`` steps
        the ODE (``xi`` unused). All ``[B, C, F, H, W]`` (``xi`` may broadcast)."""
        if self.rule == "x0":
            return (1 - nxt) * x0 + nxt * xi.to(x0.dtype)
        return x + (nxt - sigma) * v


def context_input(x0: torch.Tensor, noise: torch.Tensor | None, sigma: float) -> torch.Tensor:
    """The context pass's input: ``(1 - sigma) x0 + sigma * noise`` (the authors'
    ``scheduler.add_noise(x0, noise, context_noise)``), or ``x0`` itself when ``noise`` is None.

    ``x0: [B, C, F, H, W]``, ``noise: [B | 1, C, F, H, W]``; returns ``x0``'s shape and dtype.
    """
    if noise is None:
        return x0
    return (1 - sigma) * x0 + sigma * noise.to(x0.dtype)


@torch.no_grad()
def write_context_pass(
    model: CausalWan,
    cache: FrameCache,
    rows: Sequence[int],
    x0: torch.Tensor,
    text: TextContext,
    start_frame: int,
    *,
    noise: torch.Tensor | None,
    sigma: float,
    timestep: float,
    plans=None,
) -> None:
    """The context pass of the finished block ``x0: [B, C, F, H, W]`` at ``start_frame``: its
    K/V written into ``rows`` from :func:`context_input` (``noise`` ``[B | 1, C, F, H, W]`` or
    None) at ``timestep``, attending through ``plans`` (None: the default view), then MemFlow's
    bank record of the block (:meth:`FrameCache.bank_record`)."""
    rows = list(rows)
    write = cache.view(rows, start_frame, x0.shape[2], plans=plans, write=True)
    x_ctx = context_input(x0, noise, sigma)
    model.write_context(x_ctx, text, start_frame, write, timestep=timestep)
    cache.bank_record(rows, start_frame)


@dataclass
class Generation:
    """What :func:`generate` returns: ``latents: [B, C, F, H, W]`` (the generated frames) and,
    when recorded, one :class:`Trajectory` per block (``block_starts[i]`` its first frame)."""

    latents: torch.Tensor
    block_starts: list[int] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)


PlanFn = Callable[[int], "Sequence[Sequence[int]] | None"]
ContextHook = Callable[..., "object"]
"""``hook(view, start_frame=, plans=) -> context``: the context a block's denoising steps use
instead of ``view`` (its rows' read-only view; ``plans`` the rows' routed frames or None)."""


def generate(
    model: CausalWan,
    cache: FrameCache,
    rows: Sequence[int],
    text: TextContext,
    noise: torch.Tensor,
    *,
    sampler: FewStepSampler | None = None,
    renoise: torch.Tensor | None = None,
    start_frame: int = 0,
    switches: dict[int, TextContext] | None = None,
    history: torch.Tensor | None = None,
    plans: PlanFn | None = None,
    record: bool = False,
    row_batch: int | None = None,
    context_timestep: float = 0.0,
    context_noise: torch.Tensor | None = None,
    context_sigma: float = 0.0,
    inject: Mapping[int, torch.Tensor] | None = None,
    context_hook: ContextHook | None = None,
) -> Generation:
    """Generate frames block by block for ``rows`` (all at the same frame), batched over rows.

    Args:
        rows: cache rows holding frames ``< start_frame`` (empty rows for ``start_frame = 0``).
        text: the prompts in force at ``start_frame`` (1 or ``len(rows)``).
        noise: ``[B | 1, C, F_total, H, W]`` initial noise of every frame to generate
            (``F_total`` a multiple of the policy's ``frames_per_block``).
        renoise: ``[S - 1, B | 1, C, F_total, H, W]`` re-noising noise (rule ``"x0"``).
        switches: ``{frame: text}`` prompt switches at block starts: the text changes and the
            window is re-encoded (:func:`recache`) first.
        history: ``[B | 1, C, start_frame, H, W]`` clean latents before ``start_frame``, needed
            when a switch re-encodes frames generated before this call.
        plans: ``plans(block_start)`` -> per-row cached frames to attend (a routing plan, used for
            the denoising steps and the context pass) or None for the policy's default.
        record: keep each block's :class:`Trajectory`.
        row_batch: process rows in micro-batches of this size (None: all at once).
        context_timestep: timestep of the context pass (0).
        context_noise: ``[B | 1, C, F_total, H, W]`` noise of the context pass, whose input is
            then ``(1 - context_sigma) x0 + context_sigma * noise`` (:func:`context_input`);
            None: the clean ``x0``.
        context_sigma: the context pass's noise level (:meth:`FlowSchedule.table_sigma`).
        inject: ``{step: [B | 1, C, F_total, H, W]}`` perturbations added before that step's
            model call (:meth:`FewStepSampler.denoise_block`), None: none.
        context_hook: wraps each block's denoising view (:data:`ContextHook`), None: none.

    Returns:
        :class:`Generation` with ``latents: [B, C, F_total, H, W]`` in ``noise``'s dtype.
    """
    sampler = sampler or FewStepSampler()
    rows = list(rows)
    batch, block = len(rows), cache.policy.frames_per_block
    total = noise.shape[2]
    if total % block:
        raise ValueError(f"noise has {total} frames, not a multiple of frames_per_block={block}")
    for tensor, name in ((noise, "noise"), (history, "history"), (context_noise, "context_noise")):
        if tensor is not None and tensor.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch {tensor.shape[0]}, expected 1 or {batch}")
    if context_noise is not None and context_noise.shape[1:] != noise.shape[1:]:
        raise ValueError(
            f"context_noise is {tuple(context_noise.shape)}, expected [1 or {batch}, "
            f"{', '.join(map(str, noise.shape[1:]))}] like noise"
        )
    switches = dict(switches or {})
    starts = range(start_frame, start_frame + total, block)
    known = 0 if history is None else history.shape[2]
    for frame in sorted(switches):
        if frame not in starts:
            raise ValueError(
                f"switch frame {frame} is not a block start in {start_frame}..{starts[-1]} "
                f"(blocks of {block} frames)"
            )
        needed = len(cache.policy.recache_frames(frame))
        if needed > frame - start_frame + known:
            raise ValueError(
                f"the switch at frame {frame} re-encodes {needed} frames but only "
                f"{frame - start_frame + known} are available: pass history (the clean latents "
                f"before start_frame={start_frame})"
            )
    row_batch = row_batch or batch
    out = noise.new_empty(batch, *noise.shape[1:])
    result = Generation(out)
    for f0 in starts:
        lo = f0 - start_frame
        if f0 in switches:
            text = switches.pop(f0)
            past = out[:, :, :lo]
            if history is not None:
                past = torch.cat([history.expand(batch, *history.shape[1:]), past], dim=2)
            recache(model, cache, rows, past, text, f0, context_timestep)
        plan = plans(f0) if plans is not None else None
        pieces, trajs = [], []
        for r0 in range(0, batch, row_batch):
            sub = slice(r0, min(r0 + row_batch, batch))
            sub_rows = rows[sub]
            sub_plan = None if plan is None else list(plan)[sub]
            sub_text = text if text.num_prompts == 1 else text.select(range(sub.start, sub.stop))
            x_noise = _rows(noise, sub, batch)[:, :, lo : lo + block]
            xi = (
                None
                if renoise is None
                else _rows(renoise, sub, batch, dim=1)[:, :, :, lo : lo + block]
            )
            cache.bank_refresh(sub_rows, sub_text)  # MemFlow's bank, before the first step
            view = cache.view(sub_rows, f0, block, plans=sub_plan)
            if context_hook is not None:
                view = context_hook(view, start_frame=f0, plans=sub_plan)
            add = None
            if inject is not None:
                add = {s: _rows(e, sub, batch)[:, :, lo : lo + block] for s, e in inject.items()}
            x0, traj = sampler.denoise_block(
                model, x_noise, sub_text, f0, view, xi, record, inject=add
            )
            eps = None
            if context_noise is not None:
                eps = _rows(context_noise, sub, batch)[:, :, lo : lo + block]
            write_context_pass(
                model, cache, sub_rows, x0, sub_text, f0, noise=eps, sigma=context_sigma,
                timestep=context_timestep, plans=sub_plan,
            )  # fmt: skip
            pieces.append(x0)
            trajs.append(traj)
        out[:, :, lo : lo + block] = torch.cat(pieces)
        if record:
            result.block_starts.append(f0)
            result.trajectories.append(
                Trajectory(
                    torch.cat([t.z for t in trajs], dim=1),
                    torch.cat([t.v for t in trajs], dim=1),
                    trajs[0].sigmas,
                )
            )
    return result


def _rows(tensor: torch.Tensor, sub: slice, batch: int, dim: int = 0) -> torch.Tensor:
    """Rows ``sub`` of a tensor whose dim ``dim`` is ``batch`` or 1 (broadcast)."""
    if tensor.shape[dim] == 1:
        shape = list(tensor.shape)
        shape[dim] = sub.stop - sub.start
        return tensor.expand(*shape)
    return tensor.narrow(dim, sub.start, sub.stop - sub.start)
