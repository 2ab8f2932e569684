"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-000123/`` with two files:

- ``tensors.safetensors``: the trainable (LoRA) weights ``policy.*``, the old policy's
  ``old.*``, the frozen initial LoRA ``ref.*`` (a run continuing ``lora_ckpt``: the KL
  reference; the KVPO authors' ``initial_generator_lora``), the EMA ``ema.*``, the optimizer's
  tensor state ``optim.<param>.<name>`` and the torch RNG states ``rng.*`` (uint8).
- ``state.json``: the step, the optimizer's param groups and scalar state, the LR scheduler,
  Python's and NumPy's RNG states and a free-form ``extra`` dict (the step counters).

It is written into a temporary sibling directory, flushed, and renamed into place; then the
``latest`` file is replaced (also write-then-rename). A crash leaves either the previous or the
new checkpoint, never a half-written one. ``keep_last`` older checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


@dataclass
class TrainingState:
    """What a checkpoint holds. Tensor dicts map parameter names to fp32/bf16 tensors;
    ``reference``: the initial LoRA's weights where the run holds them (else None)."""

    step: int
    policy: dict[str, torch.Tensor]
    old_policy: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict
    scheduler: dict
    rng: dict
    extra: dict = field(default_factory=dict)
    reference: dict[str, torch.Tensor] | None = None


def capture_rng() -> dict:
    """Global RNG states of torch (CPU and every CUDA device), NumPy and Python."""
    np_state = np.random.get_state()  # noqa: NPY002 (the global state is what we restore)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": _to_json(random.getstate()),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))  # noqa: NPY002
    random.setstate(_from_json(state["python"]))


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, tuple | list) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in (tensors or {}).items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(run_dir: str | Path, state: TrainingState, keep_last: int = 2) -> Path:
    """Write ``state`` atomically under ``run_dir/checkpoints`` and point ``latest`` at it."""
    final = checkpoint_dir(run_dir, state.step)
    optim_tensors, optim_meta = _split_optimizer(state.optimizer)
    rng = state.rng
    tensors = {
        **_prefixed("policy", state.policy),
        **_prefixed("old", state.old_policy),
        **_prefixed("ema", state.ema),
        **_prefixed("ref", state.reference),
        **optim_tensors,
        "rng.torch": rng["torch"],
        **{f"rng.cuda.{i}": s for i, s in enumerate(rng["cuda"])},
    }
    meta = {
        "format": "kvpo-checkpoint-1",
        "step": state.step,
        "has_ema": state.ema is not None,
        "has_reference": state.reference is not None,
        "optimizer": optim_meta,
        "scheduler": state.scheduler,
        "rng": {"numpy": rng["numpy"], "python": rng["python"], "cuda": len(rng["cuda"])},
        "extra": state.extra,
    }
    with _replaced_atomically(final) as tmp:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        _write_synced(tmp / "state.json", json.dumps(meta))
    _write_synced(final.parent / f".{LATEST}.tmp", final.name)
    os.replace(final.parent / f".{LATEST}.tmp", final.parent / LATEST)
    for old in sorted(final.parent.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


@contextmanager
def _replaced_atomically(final: Path) -> Iterator[Path]:
    """Yield a fresh sibling directory to fill; on success it replaces ``final`` by rename, on
    error it is removed and ``final`` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, its ``checkpoints`` parent or a run directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.json").is_file():
            return candidate
        if (candidate / LATEST).is_file():
            found = candidate / (candidate / LATEST).read_text().strip()
            if (found / "state.json").is_file():
                return found
    raise FileNotFoundError(
        f"no checkpoint at {str(path)!r}: expected a directory with state.json, or a run "
        "directory whose checkpoints/latest names one"
    )


def load_checkpoint(path: str | Path) -> TrainingState:
    """Read a checkpoint written by :func:`save_checkpoint` (CPU tensors)."""
    directory = resolve_checkpoint(path)
    meta = json.loads((directory / "state.json").read_text())
    if meta.get("format") != "kvpo-checkpoint-1":
        raise ValueError(
            f"{directory} has format {meta.get('format')!r}, expected kvpo-checkpoint-1"
        )
    tensors = load_file(str(directory / "tensors.safetensors"))
    optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    rng = {
        "torch": tensors["rng.torch"],
        "cuda": [tensors[f"rng.cuda.{i}"] for i in range(meta["rng"]["cuda"])],
        "numpy": meta["rng"]["numpy"],
        "python": meta["rng"]["python"],
    }
    return TrainingState(
        step=meta["step"],
        policy=_unprefixed("policy", tensors),
        old_policy=_unprefixed("old", tensors),
        ema=_unprefixed("ema", tensors) if meta["has_ema"] else None,
        optimizer=_join_optimizer(optim_tensors, meta["optimizer"]),
        scheduler=meta["scheduler"],
        rng=rng,
        extra=meta["extra"],
        reference=_unprefixed("ref", tensors) if meta.get("has_reference") else None,
    )


def export_adapter(model, directory: str | Path, adapter: str = "default") -> Path:
    """Write ``adapter`` of ``model`` in peft's format (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained(
    WanTransformer3DModel(...), directory)``; replaced atomically."""
    from kvpo.models.lora import lora_state_dict

    directory = Path(directory)
    weights = {
        f"base_model.model.{k}": v.contiguous().cpu()
        for k, v in lora_state_dict(model, adapter).items()
    }
    with _replaced_atomically(directory) as tmp:
        model.transformer.peft_config[adapter].save_pretrained(str(tmp))
        save_file(weights, str(tmp / "adapter_model.safetensors"))
    return directory
