"""The policy's LoRA adapters at the start of a run (``lora_ckpt``, ``lora_init``, ``adapter.*``).

Three starts, all giving adapter ``"default"`` (trainable) and its frozen copy ``"old"`` (the old
policy, re-synced every ``sync_every`` rollouts):

- no ``lora_ckpt``: a fresh adapter (``adapter.rank``, ``adapter.alpha``; ``B = 0``); the initial
  policy is the base model (adapters disabled).
- ``lora_init: continue`` (default; the KVPO authors' trainer, ``KVPOTrainer._build_models`` in
  ``models/longlive/trainer/kvpo.py``): the trained adapter *is* ``lora_ckpt`` (its rank, alpha
  ``lora_ckpt_alpha``, its target modules), so the LoRA's ``A`` and ``B`` keep training; the
  initial policy is a frozen copy ``"ref"`` of it (their ``initial_generator``, a deep copy of the
  generator with that LoRA), made when ``kl_reference_initial``. ``adapter.rank`` and
  ``adapter.alpha`` must describe that LoRA.
- ``lora_init: merge``: ``W += (alpha / rank) B A`` into the frozen base, then a fresh adapter
  of ``adapter.rank`` / ``adapter.alpha`` trains on top; the initial policy is the merged model
  (adapters disabled): the same function, another parametrisation of the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpo.models.causal_wan import CausalWan
from kvpo.models.lora import (
    add_lora,
    freeze_copy,
    import_lora,
    lora_parameters,
    merge_lora_into_base,
)
from kvpo.training.distributed import DistInfo, broadcast_parameters

LORA_INITS = ("continue", "merge")
REFERENCE = "ref"


@dataclass
class PolicyAdapters:
    """``params``: the trainable parameters by name (adapter ``"default"``); ``initial``: the
    adapter holding the initial policy (``"ref"``), None where it is the model with adapters
    disabled; ``kl_reference``: the KL's reference (``initial``, or ``"old"`` when
    ``kl_reference_initial`` is false)."""

    params: dict[str, torch.nn.Parameter]
    initial: str | None
    kl_reference: str | None


def setup_adapters(model: CausalWan, cfg, info: DistInfo | None = None) -> PolicyAdapters:
    """Create the adapters of ``cfg`` in ``model`` (see the module docstring); rank 0's
    trainable weights are broadcast to every rank."""
    initial = None
    if cfg.lora_ckpt is not None and cfg.lora_init not in LORA_INITS:
        raise ValueError(f"lora_init must be one of {LORA_INITS}, got {cfg.lora_init!r}")
    if cfg.lora_ckpt is not None and cfg.lora_init == "continue":
        _continue_lora(model, cfg)
        if cfg.kl_reference_initial:
            initial = REFERENCE
    else:
        if cfg.lora_ckpt is not None:
            merge_lora_into_base(model, cfg.lora_ckpt, cfg.lora_ckpt_alpha)
        targets = cfg.adapter.target_modules
        kwargs = {"targets": targets} if targets else {}
        add_lora(model, cfg.adapter.rank, cfg.adapter.alpha, dropout=cfg.adapter.dropout, **kwargs)
    params = lora_parameters(model, "default")
    broadcast_parameters(list(params.values()), info or DistInfo())
    if initial is not None:
        freeze_copy(model, "default", initial)
    freeze_copy(model, "default", "old")
    return PolicyAdapters(params, initial, initial if cfg.kl_reference_initial else "old")


def _continue_lora(model: CausalWan, cfg) -> None:
    """Load ``lora_ckpt`` as the trainable adapter; its rank and alpha must be ``adapter.*``'s."""
    rank = import_lora(model, cfg.lora_ckpt, alpha=cfg.lora_ckpt_alpha, dropout=cfg.adapter.dropout)
    alpha = float(model.transformer.peft_config["default"].lora_alpha)
    want = (cfg.adapter.rank, float(cfg.adapter.alpha or cfg.adapter.rank))
    if (rank, alpha) != want:
        raise ValueError(
            f"lora_init=continue trains lora_ckpt itself: it has rank {rank} and alpha {alpha:g} "
            f"(lora_ckpt_alpha, else its adapter_config.json, else its rank), but adapter.rank = "
            f"{want[0]} and adapter.alpha = {want[1]:g}; set them to the LoRA's values, or "
            "lora_init=merge to train a fresh adapter on top of it"
        )
