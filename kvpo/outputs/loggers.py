"""Metric logging: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when asked.

Each JSONL line is one flat record ``{"step": n, "time": s, "<group>/<name>": value, ...}``
(nested dicts flattened with ``/``; tensors become numbers, or lists for per-branch values;
``time``: seconds since the logger was created). TensorBoard and W&B receive the record's finite
scalars only (lists are left to the JSONL), at ``step``. Only the process that writes (rank 0)
passes ``enabled=True``; elsewhere the logger creates and imports nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def flatten(record: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; tensors become numbers (one element) or lists."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, torch.Tensor):
            out[name] = value.item() if value.numel() == 1 else value.detach().cpu().tolist()
        else:
            out[name] = value
    return out


def scalars(flat: dict) -> dict[str, float]:
    """The finite numbers of a flat record (booleans as 0 / 1), without ``step``."""
    return {
        key: float(value)
        for key, value in flat.items()
        if key != "step" and isinstance(value, int | float) and math.isfinite(value)
    }


def _require(module: str, package: str, feature: str):
    """Import ``module`` or raise an ImportError naming the pip ``package``."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(
            f"{feature} needs the `{package}` package ({err}): pip install {package}"
        ) from err


class MetricsLogger:
    """Appends records to ``<run_dir>/metrics.jsonl``; optionally to TensorBoard event files in
    ``<run_dir>/tensorboard`` and to a W&B run (files under ``<run_dir>/wandb``).

    ``wandb_mode``: ``"online"``, ``"offline"`` or ``"disabled"`` (None: W&B's default, which
    the ``WANDB_MODE`` environment variable sets); ``config``: the run's resolved config, stored
    with the W&B run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "kvpo",
        wandb_name: str | None = None,
        wandb_mode: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._start = time.time()
        self._tb = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            _require("tensorboard", "tensorboard", "TensorBoard logging")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb:
            module = _require("wandb", "wandb", "Weights & Biases logging")
            self._wandb = module.init(
                project=wandb_project,
                name=wandb_name,
                dir=str(self.run_dir),
                config=config,
                mode=wandb_mode,
            )

    def log(self, step: int, record: dict) -> dict:
        """Write ``record`` (nested dicts allowed) at ``step``; returns the flat record."""
        flat = {"step": step, "time": round(time.time() - self._start, 3), **flatten(record)}
        if not self.enabled:
            return flat
        with open(self.path, "a") as f:
            f.write(json.dumps(flat, default=float) + "\n")
        values = scalars(flat)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        return flat

    def close(self) -> None:
        """Flush and close TensorBoard and finish the W&B run (idempotent)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (``[]`` when there is none). A last line cut short
    (the process killed mid-write) is dropped; any other unreadable line raises ValueError."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: an interrupted write
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from err
    return records
