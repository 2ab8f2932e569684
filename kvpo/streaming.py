"""Streaming generation: one object that owns what generating a video needs.

:class:`StreamingGenerator` holds the video model (causal transformer, prompt encoder, decoder),
its paged frame cache, the few-step sampler and schedule, the context timestep and the video
layout (frames and prompt-switch frames). The group rollout, the replay, held-out evaluation,
``kvpo sample`` and ``kvpo evaluate`` all generate through it, so they share two rules:

- **noise**: a video's noise comes from one integer seed (:meth:`StreamingGenerator.noise`): one
  CPU generator draws the initial noise ``[1, C, T, H, W]``, then the re-noising noise
  ``[S - 1, 1, C, T, H, W]`` and then the context passes' noise ``[1, C, T, H, W]`` (device
  independent; every row of a group shares it, so branches differ only by routing). Seeds:
  :func:`group_seed` for a training group, :func:`heldout_seed` for a held-out
  ``(prompt, seed)`` pair, the user's seed when sampling.
- **page budget**: :meth:`StreamingGenerator.pages_for`: the fork snapshot's resident frames
  plus, per row alive at once, what a lean row can hold (:mod:`kvpo.models.frame_cache`).

Prompt segments are passed as one :class:`~kvpo.models.TextContext` per segment; segment ``k + 1``
starts at ``layout.switches[k]`` (latent frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpo.models import (
    CachePolicy,
    FewStepSampler,
    FlowSchedule,
    FrameCache,
    Generation,
    TextContext,
    generate,
    recache,
)
from kvpo.rewards.clips import VideoLayout
from kvpo.training.distributed import rank_seed
from kvpo.video_model import VideoModel


@dataclass
class VideoNoise:
    """Noise of B videos: ``noise [B, C, T, H, W]``, ``renoise [S - 1, B, C, T, H, W]`` and
    ``context [B, C, T, H, W]`` (the context passes' noise, used when the context level is
    not 0: :attr:`StreamingGenerator.context_sigma`)."""

    noise: torch.Tensor
    renoise: torch.Tensor
    context: torch.Tensor

    @classmethod
    def draw(cls, seed: int, shape: Sequence[int], steps: int, device, dtype) -> VideoNoise:
        """One video's noise (``B = 1``) of ``shape = (C, T, H, W)`` from ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(1, *shape, generator=gen)
        renoise = torch.randn(max(steps - 1, 0), 1, *shape, generator=gen)
        context = torch.randn(1, *shape, generator=gen)
        return cls(*(x.to(device, dtype) for x in (noise, renoise, context)))

    @classmethod
    def stack(cls, parts: Sequence[VideoNoise]) -> VideoNoise:
        """The videos of ``parts`` as one batch."""
        return cls(
            torch.cat([p.noise for p in parts]),
            torch.cat([p.renoise for p in parts], dim=1),
            torch.cat([p.context for p in parts]),
        )

    def frames(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noise, renoise, context)`` of frames ``[lo, hi)``."""
        return self.noise[:, :, lo:hi], self.renoise[:, :, :, lo:hi], self.context[:, :, lo:hi]


def group_seed(seed: int, step: int, rank: int) -> int:
    """Noise seed of the group of training step ``step`` on ``rank``."""
    return rank_seed(seed, rank, stream=1_000_000 + step)


def branch_seed(noise_seed: int, branch: int) -> int:
    """Seed of branch ``branch``'s own noise in a group whose shared noise comes from
    ``noise_seed`` (the exploration baselines, :mod:`kvpo.method.exploration`)."""
    return rank_seed(noise_seed, branch, stream=2_000_000)


def heldout_seed(base_seed: int, prompt_index: int, seed_index: int) -> int:
    """Noise seed of held-out video ``(prompt_index, seed_index)``: the same before and after
    training, on any rank."""
    return rank_seed(base_seed, 10_000 + prompt_index, stream=seed_index)


class StreamingGenerator:
    """Model + cache + sampler + layout (see the module docstring).

    Args:
        model: the :class:`~kvpo.video_model.VideoModel` (its ``wan`` holds the weights in use).
        policy: sink + window cache policy.
        schedule: the few-step schedule; ``rule``: the sampler's update rule (``"x0"``/``"euler"``).
        layout: frames of a video and its prompt-switch frames, in latent frames.
        context_timestep: timestep of the context pass that writes a block's K/V.
        context_sigma: noise level of the context pass's input ``(1 - sigma) x0 + sigma *
            noise.context`` (0: the clean ``x0``; the authors': :meth:`FlowSchedule.table_sigma`
            of the context timestep).
        rows: cache rows alive at once (a micro-batch of rows); sizes the page pool.
        window_frames: frames a replay records from the fork (the policy window); sizes the
            page pool (a grad replay keeps every block's view of them until the backward).
        backend: kvpo_kernels backend of the cache (None: auto).

    ``context_hook`` (None): when set, wraps every block's denoising view
    (:data:`kvpo.models.sampler.ContextHook`), e.g. to measure attention; generation is
    unchanged as long as the hook's context attends as the view does.
    """

    def __init__(
        self,
        model: VideoModel,
        policy: CachePolicy,
        schedule: FlowSchedule,
        *,
        rule: str,
        layout: VideoLayout,
        context_timestep: float = 0.0,
        context_sigma: float = 0.0,
        rows: int = 1,
        window_frames: int = 0,
        backend: str | None = None,
    ) -> None:
        self.model, self.wan = model, model.wan
        self.layout = layout
        self.context_timestep = float(context_timestep)
        self.context_sigma = float(context_sigma)
        self.sampler = FewStepSampler(schedule, rule=rule)
        self.rows = rows
        self.context_hook = None
        self.cache = FrameCache.create(
            self.wan.config,
            policy,
            self.pages_for(
                policy,
                rows,
                window_frames,
                policy.bank_pages(model.wan.config.num_layers, layout.num_frames),
            ),
            dtype=self.wan.dtype,
            device=self.wan.device,
            backend=backend,
        )

    @staticmethod
    def pages_for(
        policy: CachePolicy, rows: int, window_frames: int = 0, bank_pages: int = 0
    ) -> int:
        """Pages for the fork snapshot (its resident frames and a block in flight) plus ``rows``
        lean rows alive at once, each holding at most its recorded window's frames (a grad
        replay's pinned views; at least ``local_attn_size``), a recache's re-encoded frames
        and a block in flight. Global attention or a full recache keeps every frame:
        ``resident_frames + window + 2F`` per row, the snapshot included. ``bank_pages``:
        MemFlow's bank pages one row may hold (:meth:`CachePolicy.bank_pages`), for the
        snapshot and every row, plus one per recorded block (a grad replay's pinned views keep
        each block's bank)."""
        F = policy.frames_per_block
        bank = (bank_pages + (-(-window_frames // F) if bank_pages else 0)) * (rows + 1)
        if policy.resident_frames == -1 or policy.recache_size == -1:
            local, resident = policy.local_attn_size, policy.resident_frames
            window = local if local > 0 else resident
            return (resident + window + 2 * F) * (rows + 1) + bank
        recache = policy.local_attn_size if policy.recache_size is None else policy.recache_size
        per_row = max(window_frames, policy.local_attn_size) + recache + F
        return policy.resident_frames + F + rows * per_row + bank

    @property
    def schedule(self) -> FlowSchedule:
        return self.sampler.schedule

    @property
    def frames_per_block(self) -> int:
        return self.cache.policy.frames_per_block

    # ------------------------------------------------------------------ prompts and noise
    def segment_texts(self, prompts: Sequence[str]) -> list[TextContext]:
        """One single-prompt context per segment of one video."""
        return [self.model.encode([p]) for p in prompts]

    def batch_texts(self, sequences: Sequence[Sequence[str]]) -> list[TextContext]:
        """One context per segment holding every video's prompt (all with equally many
        segments)."""
        counts = {len(s) for s in sequences}
        if len(counts) != 1:
            raise ValueError(f"videos of one batch need equally many segments, got {counts}")
        return [self.model.encode([s[k] for s in sequences]) for k in range(counts.pop())]

    def text_at(self, texts: Sequence[TextContext], frame: int) -> TextContext:
        """The prompt in force at ``frame``."""
        return texts[min(self.layout.segment_of(frame), len(texts) - 1)]

    def switches(
        self, texts: Sequence[TextContext], lo: int, hi: int, include_lo: bool = False
    ) -> dict[int, TextContext]:
        """``{frame: text}`` of the prompt switches in ``(lo, hi)`` (``[lo, hi)`` with
        ``include_lo``)."""
        return {
            f: texts[min(k + 1, len(texts) - 1)]
            for k, f in enumerate(self.layout.switches)
            if (lo < f or (include_lo and f == lo)) and f < hi
        }

    def noise(self, seed: int, num_frames: int | None = None) -> VideoNoise:
        """The noise of one video from ``seed`` (``num_frames``: default the layout's)."""
        C, H, W = self.model.latent_shape
        T = num_frames or self.layout.num_frames
        return VideoNoise.draw(
            seed, (C, T, H, W), self.schedule.num_steps, self.wan.device, self.wan.dtype
        )

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        rows: Sequence[int],
        texts: Sequence[TextContext],
        noise: VideoNoise,
        start: int,
        end: int,
        *,
        switch_at_start: bool = False,
        history: torch.Tensor | None = None,
        plans=None,
        record: bool = False,
        inject=None,
    ) -> Generation:
        """Frames ``[start, end)`` for ``rows`` (holding frames ``< start``), with the prompt in
        force at ``start`` and the switches after it (and at ``start`` when
        ``switch_at_start``: its recache runs first). ``noise`` covers the whole video;
        ``history``, ``plans``, ``record``: see :func:`kvpo.models.generate`; ``inject``
        ``{step: [B | 1, C, end - start, H, W]}``: perturbations of the noisy latents."""
        x, xi, eps = noise.frames(start, end)
        return generate(
            self.wan,
            self.cache,
            rows,
            self.text_at(texts, start),
            x,
            sampler=self.sampler,
            renoise=xi,
            start_frame=start,
            switches=self.switches(texts, start, end, include_lo=switch_at_start),
            history=history,
            plans=plans,
            record=record,
            context_timestep=self.context_timestep,
            context_noise=self.context_noise(eps),
            context_sigma=self.context_sigma,
            inject=inject,
            context_hook=self.context_hook,
        )

    def context_noise(self, eps: torch.Tensor) -> torch.Tensor | None:
        """The context passes' noise to use: ``eps`` (from :class:`VideoNoise`), or None when
        the context level is 0 (clean input)."""
        return eps if self.context_sigma else None

    def recache(self, rows: Sequence[int], past: torch.Tensor, text: TextContext, frame: int):
        """Prompt-switch recache at ``frame`` from the clean latents ``past [B | 1, C, frame,
        H, W]`` (:func:`kvpo.models.recache`)."""
        return recache(self.wan, self.cache, rows, past, text, frame, self.context_timestep)

    @torch.no_grad()
    def videos(self, sequences: Sequence[Sequence[str]], seeds: Sequence[int]) -> torch.Tensor:
        """Unrouted videos ``[B, T_video, 3, H, W]`` in [0, 1] of ``sequences[i]`` (prompt
        segments) with noise from ``seeds[i]``, generated as one batch of rows from frame 0."""
        if len(sequences) != len(seeds):
            raise ValueError(f"need one seed per video, got {len(sequences)} and {len(seeds)}")
        texts = self.batch_texts(sequences)
        noise = VideoNoise.stack([self.noise(s) for s in seeds])
        rows = self.cache.new_rows(len(seeds), lean=True)
        try:
            out = self.generate(rows, texts, noise, 0, self.layout.num_frames)
        finally:
            self.cache.free(rows)
        return self.model.decode(out.latents)


def stream_from_config(model: VideoModel, cfg, rows: int) -> StreamingGenerator:
    """The :class:`StreamingGenerator` of a :class:`~kvpo.training.config.TrainConfig` with
    ``rows`` cache rows alive at once."""
    schedule = cfg.schedule()
    return StreamingGenerator(
        model,
        cfg.cache_policy(),
        schedule,
        rule=cfg.sampler_rule,
        layout=cfg.latent_layout(),
        context_timestep=float(cfg.context_noise),
        context_sigma=schedule.table_sigma(cfg.context_noise) if cfg.context_add_noise else 0.0,
        rows=rows,
        window_frames=cfg.policy_frames(),
        backend=None if cfg.kernel_backend == "auto" else cfg.kernel_backend,
    )
