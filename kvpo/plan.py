"""``kvpo plan`` / ``python -m kvpo.plan``: predicted peak device memory of a training step.

    kvpo plan --config configs/longlive.yaml --gpu-memory 80GiB
    kvpo plan --config configs/longlive.yaml --gpu-memory 141GB gradient_checkpointing=false
    kvpo plan --gpu-memory 24GiB --row-micro-batch 2          # one value instead of choosing

Prints, per phase of one step (rollout, decode, scoring, the three replays, the update), what is
resident for the whole run and what the phase adds, then picks the largest ``row_micro_batch``
whose every phase fits the memory, or says which phases do not fit and which options would make
them fit. Nothing is loaded: shapes come from the config (docs/memory.md). The same planner
resolves ``row_micro_batch: auto`` when a run starts on a GPU.
"""

from __future__ import annotations

import argparse
import sys

from kvpo.training.config import ConfigError
from kvpo.training.config_parse import load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpo plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file; default: the toy run")
    parser.add_argument(
        "--gpu-memory",
        required=True,
        help="device memory: 80GiB, 141GB, 24576MiB, or bytes (GiB = 2^30, GB = 10^9)",
    )
    parser.add_argument(
        "--row-micro-batch",
        type=int,
        help="show the plan of this value (0 = all rows) instead of the planner's choice",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _check(cfg) -> list[str]:
    """The config problems that make a plan meaningless (files need not exist to plan)."""
    from kvpo.training import validation

    problems = validation._ranges(cfg) + validation._layout(cfg)
    return problems or validation._routing(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvpo.planning import SizeError, parse_size
    from kvpo.planning.choose import choose_row_micro_batch
    from kvpo.planning.externals import setup_for
    from kvpo.planning.report import report

    try:
        total = parse_size(args.gpu_memory)
        cfg = load_config(args.config, args.overrides)
        problems = _check(cfg)
        if problems:
            raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        if args.row_micro_batch is not None and not 0 <= args.row_micro_batch <= cfg.K + 1:
            raise ConfigError(f"--row-micro-batch must be in 0..{cfg.K + 1} (0 = all rows)")
    except (SizeError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup = setup_for(cfg, "cuda")
    if args.row_micro_batch is not None:
        choice = _only(cfg, setup, total, args.row_micro_batch)
    else:
        choice = choose_row_micro_batch(cfg, total, setup)
    print(report(choice, setup, total, args.config or "the toy default"))
    return 0 if choice.fits else 1


def _only(cfg, setup, total: int, value: int):
    """The :class:`~kvpo.planning.choose.Choice` of one ``row_micro_batch`` value."""
    from kvpo.planning.choose import Choice, usable_bytes
    from kvpo.planning.phases import plan_memory
    from kvpo.planning.sizes import gib

    usable = usable_bytes(total)
    plan = plan_memory(cfg, setup, value)
    name, peak = plan.peak
    over = [(p.name, plan.total(p)) for p in plan.phases if plan.total(p) > usable]
    message = f"row_micro_batch={value}: predicted peak {gib(peak)} in {name}, {gib(usable)} usable"
    return Choice(value, not over, plan, usable, {value: plan}, over, [], message)


if __name__ == "__main__":
    sys.exit(main())
