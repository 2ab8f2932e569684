"""A trainer's resumable state <-> :class:`~kvpo.training.checkpoint.TrainingState`.

Saved: the policy adapter (``"default"``), the old-policy adapter (``"old"``), the initial LoRA
(``"ref"``, where a run continuing ``lora_ckpt`` holds it), the EMA, AdamW and
the LR schedule, the counters (:class:`~kvpo.training.learner.Counters`: training steps, rollouts,
rollouts since the last sync, skips), and rank 0's global RNG states. Every random draw of a
rollout (routing plan, prompts, noise) is seeded by ``(seed, rollout index, rank)``, so a resumed
run repeats the uninterrupted one bit for bit, also from a checkpoint taken inside a sync period.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kvpo.models.lora import adapters, lora_parameters
from kvpo.training.adapters import REFERENCE
from kvpo.training.checkpoint import TrainingState, load_checkpoint, restore_rng, save_checkpoint


def _named(trainer, adapter: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in lora_parameters(trainer.model, adapter).items()}


def save_state(trainer, run_dir: str | Path, rng: dict, write: bool = True) -> Path | None:
    """Checkpoint ``trainer`` under ``run_dir`` (only where ``write``: rank 0)."""
    if not write:
        return None
    state = TrainingState(
        step=trainer.counters.step,
        policy=_named(trainer, "default"),
        old_policy=_named(trainer, "old"),
        ema=dict(trainer.ema.shadow) if trainer.ema is not None else None,
        optimizer=trainer.optimizer.state_dict(),
        scheduler=trainer.scheduler.state_dict(),
        rng=rng,
        extra={"counters": dataclasses.asdict(trainer.counters)},
        reference=_named(trainer, REFERENCE) if REFERENCE in adapters(trainer.model) else None,
    )
    return save_checkpoint(run_dir, state)


def load_state(trainer, path: str | Path) -> None:
    """Restore ``trainer`` from the checkpoint at ``path`` (run dir or checkpoint dir)."""
    state = load_checkpoint(path)
    if "rollouts" not in state.extra["counters"]:
        raise ValueError(
            f"checkpoint {path} predates training steps of sync_every rollouts (its step counts "
            "rollouts and its LR schedule was stepped per update): it cannot resume exactly; "
            "start a new run (lora_ckpt=<run>/adapter/adapter_model.safetensors keeps its weights)"
        )
    has_reference = REFERENCE in adapters(trainer.model)
    if has_reference != (state.reference is not None):
        raise ValueError(
            f"checkpoint {path} {'holds' if state.reference is not None else 'has no'} an initial "
            f"LoRA (a run continuing lora_ckpt), the model {'has' if has_reference else 'has not'}"
            ": resume with the run's lora_ckpt, lora_init and kl_reference_initial"
        )
    saved = [("default", state.policy), ("old", state.old_policy)]
    for adapter, weights in saved + ([(REFERENCE, state.reference)] if has_reference else []):
        params = lora_parameters(trainer.model, adapter)
        if set(params) != set(weights):
            raise ValueError(
                f"checkpoint adapter {adapter!r} does not fit the model: "
                f"{sorted(set(weights) ^ set(params))[:6]} differ (same adapter.* settings?)"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name].to(param.device, param.dtype))
    if trainer.ema is not None and state.ema is not None:
        trainer.ema.shadow = {k: v.to(trainer.device) for k, v in state.ema.items()}
    trainer.optimizer.load_state_dict(state.optimizer)
    trainer.scheduler.load_state_dict(state.scheduler)
    for key, value in state.extra["counters"].items():
        if hasattr(trainer.counters, key):  # earlier checkpoints also held a reward history
            setattr(trainer.counters, key, value)
    restore_rng(state.rng)
