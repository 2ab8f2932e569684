"""The run's progress counters (what a checkpoint carries to resume exactly)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counters:
    """Progress that a checkpoint must carry to resume exactly.

    A *training step* is ``sync_every`` rollouts, as one step of the KVPO authors' ``self.step``
    is ``gradient_accumulation_steps`` rollouts: each rollout makes ``ppo_epochs`` AdamW updates;
    at the end of the step the old policy is re-synced, the LR schedule advanced once and
    ``step`` counted (``Learner.end_rollout``). ``max_train_steps``, ``lr_warmup_steps`` and the
    ``*_interval_steps`` count training steps; a run makes ``max_train_steps * sync_every``
    rollouts and ``max_train_steps * sync_every * ppo_epochs`` updates (skipped rollouts included,
    without their updates).

    ``step``: training steps done (the scheduler's ``last_epoch`` is ``step + 1``).
    ``rollouts``: rollouts done, skipped ones included; the next rollout's index, which seeds its
    prompts, routing plan and noise. ``since_sync``: rollouts since the last old-policy sync
    (``rollouts == step * sync_every + since_sync``). ``consecutive_skips`` / ``skipped``:
    skipped rollouts in a row / in all.
    """

    step: int = 0
    rollouts: int = 0
    since_sync: int = 0
    consecutive_skips: int = 0
    skipped: int = 0
