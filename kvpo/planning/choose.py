"""Choosing ``row_micro_batch``: the largest value whose predicted peak fits the device.

The usable memory is the device's total less :data:`CONTEXT_BYTES` (the CUDA context, cuBLAS /
cuDNN workspaces and NCCL buffers, which PyTorch's allocator does not see), less
:data:`FRAGMENTATION` of the rest (blocks the caching allocator holds but cannot reuse for a
tensor of another size). Candidates go from all ``G + 1`` rows (``0``) down to one; the first
whose every phase fits is chosen. When none fits, the answer names the phases over the limit
and tries the options that lower memory (gradient checkpointing, offloading the reward model,
bf16, fewer grad-carrying steps), alone and together.

At the start of a run (``row_micro_batch: auto``) :func:`start_config` resolves the value for the
run's device: ``torch.cuda.get_device_properties(device).total_memory`` on CUDA; on a CPU all
rows, said in one printed line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from kvpo.models.config import WanConfig
from kvpo.planning.externals import Setup, setup_for
from kvpo.planning.phases import MemoryPlan, plan_memory
from kvpo.planning.sizes import gib
from kvpo.training.config import TrainConfig

FRAGMENTATION = 0.08
CONTEXT_BYTES = 2**30


def usable_bytes(total: int) -> int:
    """What the planner lets a run allocate on a device of ``total`` bytes."""
    return int((total - CONTEXT_BYTES) * (1 - FRAGMENTATION))


@dataclass
class Choice:
    """The chosen ``row_micro_batch`` (0: all rows), whether it fits, its plan, every
    candidate's plan, and when nothing fits the phases over the limit and the options tried."""

    row_micro_batch: int
    fits: bool
    plan: MemoryPlan | None
    usable: int | None = None
    candidates: dict[int, MemoryPlan] = field(default_factory=dict)
    over: list[tuple[str, int]] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    message: str = ""


def candidates(cfg: TrainConfig) -> list[int]:
    """``row_micro_batch`` values from all rows (0) down to 1."""
    return [0, *range(cfg.K, 0, -1)]


def best_fit(cfg: TrainConfig, setup: Setup, usable: int) -> tuple[int | None, dict]:
    """The largest fitting ``row_micro_batch`` (None: none fits) and every candidate's plan."""
    plans = {c: plan_memory(cfg, setup, c) for c in candidates(cfg)}
    for c, plan in plans.items():
        if plan.peak[1] <= usable:
            return c, plans
    return None, plans


def choose_row_micro_batch(
    cfg: TrainConfig, total: int, setup: Setup | None = None, *, explain: bool = True
) -> Choice:
    """The :class:`Choice` for a device of ``total`` bytes (``setup``: default a CUDA device;
    ``explain``: when nothing fits, also try the memory-lowering options)."""
    setup = setup or setup_for(cfg, "cuda")
    usable = usable_bytes(total)
    chosen, plans = best_fit(cfg, setup, usable)
    if chosen is not None:
        plan = plans[chosen]
        name, peak = plan.peak
        what = "all rows" if chosen == 0 else f"{chosen} row{'s' if chosen > 1 else ''}"
        message = (
            f"row_micro_batch={chosen} ({what} at once): predicted peak {gib(peak)} in {name}, "
            f"{gib(usable)} usable of {gib(total)}"
        )
        return Choice(chosen, True, plan, usable, plans, message=message)
    plan = plans[1]
    over = [(p.name, plan.total(p)) for p in plan.phases if plan.total(p) > usable]
    options = _options(cfg, setup, usable) if explain else []
    name, peak = plan.peak
    message = (
        f"no row_micro_batch fits {gib(usable)} usable of {gib(total)}: even one row peaks at "
        f"{gib(peak)} in {name}"
    )
    return Choice(1, False, plan, usable, plans, over, options, message)


def _variants(cfg: TrainConfig, setup: Setup) -> list[tuple[str, dict]]:
    """The configuration changes that lower memory and are not already in ``cfg``."""
    from kvpo.planning.externals import reward_footprint

    out = []
    if not cfg.gradient_checkpointing and cfg.log_prob_grad_steps > 0:
        out.append(("gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if not cfg.reward_offload and reward_footprint(cfg, setup).weights:
        out.append(("reward_offload=true", {"reward_offload": True}))
    if setup.wan and setup.dtype == "float32":
        out.append(("dtype=bfloat16", {"dtype": "bfloat16"}))
    if cfg.log_prob_grad_steps > 1:
        out.append(("log_prob_grad_steps=1 (changes the method)", {"log_prob_grad_steps": 1}))
    return out


def _options(cfg: TrainConfig, setup: Setup, usable: int) -> list[str]:
    """One line per option tried (alone, then all together) saying whether it makes it fit."""
    variants = _variants(cfg, setup)
    trials = [(name, changes) for name, changes in variants]
    if len(variants) > 1:
        merged = {k: v for _, changes in variants for k, v in changes.items()}
        trials.append((" + ".join(name.split(" (")[0] for name, _ in variants), merged))
    lines = []
    for name, changes in trials:
        trial = dataclasses.replace(cfg, **changes)
        trial_setup = setup_for(trial, setup.device_type, setup.model)
        chosen, plans = best_fit(trial, trial_setup, usable)
        if chosen is not None:
            peak = plans[chosen].peak
            lines.append(
                f"{name}: fits at row_micro_batch={chosen} (peak {gib(peak[1])} in {peak[0]})"
            )
        else:
            peak = plans[1].peak
            lines.append(
                f"{name}: still does not fit (one row peaks at {gib(peak[1])} in {peak[0]})"
            )
    if not any(": fits" in line for line in lines):
        lines.append(_no_option(cfg, setup, usable, trials[-1][1] if trials else {}))
    return lines


def _no_option(cfg: TrainConfig, setup: Setup, usable: int, changes: dict) -> str:
    """What remains over the limit with every option applied, and its largest lines."""
    trial = dataclasses.replace(cfg, **changes)
    plan = plan_memory(trial, setup_for(trial, setup.device_type, setup.model), 1)
    name, peak = plan.peak
    phase = next(p for p in plan.phases if p.name == name)
    biggest = sorted(plan.resident + phase.lines, key=lambda line: -line.bytes)[:4]
    parts = ", ".join(f"{line.what} {gib(line.bytes)}" for line in biggest)
    return (
        f"no configuration option makes it fit: with all of them one row still peaks at "
        f"{gib(peak)} in {name} ({gib(peak - usable)} over); largest: {parts}"
    )


# ---------------------------------------------------------------------- at the start of a run
def auto_row_micro_batch(cfg: TrainConfig, device=None, model: WanConfig | None = None) -> Choice:
    """The value ``row_micro_batch: auto`` takes on ``device`` (default: the config's on this
    machine): the planner's choice on CUDA, all rows on a CPU."""
    import torch

    from kvpo.training.config_parse import device_type

    if device is None:
        kind = device_type(cfg)
        device = torch.device(cfg.device if cfg.device != "auto" else kind)
    device = torch.device(device)
    if device.type != "cuda":
        return Choice(
            0, True, None,
            message=f"row_micro_batch=auto on {device.type}: all {cfg.K + 1} rows at once "
            "(the planner sizes for a GPU's memory)",
        )  # fmt: skip
    total = torch.cuda.get_device_properties(device).total_memory
    choice = choose_row_micro_batch(cfg, total, setup_for(cfg, "cuda", model), explain=False)
    choice.message = f"row_micro_batch=auto on {torch.cuda.get_device_name(device)}: " + (
        choice.message
        if choice.fits
        else f"{choice.message}; using 1 (run `kvpo plan` for the options)"
    )
    return choice


def start_config(
    cfg: TrainConfig, device, model: WanConfig | None = None, log: Callable[[str], None] = print
) -> TrainConfig:
    """``cfg`` with ``row_micro_batch: auto`` resolved for ``device`` (one line logged), and a
    line when float32 runs on a GPU."""
    import torch

    from kvpo.training.config_parse import resolved_dtype

    device = torch.device(device)
    if device.type == "cuda" and resolved_dtype(cfg, "cuda") == "float32":
        log(
            "dtype float32 on a GPU: routed attention runs in IEEE fp32, without tensor cores "
            "(dtype=bfloat16, or auto for a Wan checkpoint)"
        )
    if cfg.row_micro_batch != "auto":
        return cfg
    choice = auto_row_micro_batch(cfg, device, model)
    log(choice.message)
    return dataclasses.replace(cfg, row_micro_batch=choice.row_micro_batch)
