"""``python -m kvpo.train``: KVPO training, from held-out evaluation to the summary table.

With no arguments it runs the built-in toy default on the CPU: loads the toy model shipped in
``kvpo/toy/weights``, evaluates held-out prompts, trains a LoRA adapter with KVPO, evaluates
again and prints each reward before and after with the paired difference and its standard error.

    python -m kvpo.train                                  # the toy default (configs/toy.yaml)
    python -m kvpo.train --config configs/longlive.yaml generator_ckpt=... data_path=...
    python -m kvpo.train max_train_steps=20 K=4 lr=1e-3  # key=value overrides (adapter.rank=8)
    python -m kvpo.train --resume runs/<run>             # continue a run bit for bit
    torchrun --nproc_per_node 2 -m kvpo.train            # one prompt group per rank

The loop itself is :class:`kvpo.training.trainer.KVPOTrainer` (callable from Python); this
module parses the command line, validates the config before any work and runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvpo.training import authors
from kvpo.training.checkpoint import resolve_checkpoint
from kvpo.training.config import ConfigError
from kvpo.training.config_parse import help_text, load_config
from kvpo.training.distributed import init_distributed, shutdown
from kvpo.training.validation import validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kvpo.train",
        description=__doc__,
        epilog="configuration keys (set in --config YAML or as key=value):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys below); defaults: the toy run")
    parser.add_argument(
        "--resume",
        help="run directory or checkpoint to continue from (its config.yaml is the base config "
        "unless --config is given; overrides apply on top, e.g. a larger max_train_steps)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="print the config resolved (a KVPO authors' file: its mapping table too), list every "
        "problem (paths missing on this machine included) and exit: 2 if there is any, 0 if the "
        "config would run",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _resumed_config(resume: str) -> Path | None:
    try:
        saved = resolve_checkpoint(resume).parent.parent / "config.yaml"
    except FileNotFoundError:
        return None  # validate() reports the missing checkpoint
    return saved if saved.is_file() else None


def _check(cfg, config: str | Path | None, resume: str | None) -> int:
    """``--check``: print the mapping table of a KVPO authors' file and the resolved config, then
    validate; a :class:`ConfigError` lists every problem (paths missing on this machine too)."""
    table = authors.check_table(config)
    if table is not None:
        print(table)
    print(json.dumps(cfg.to_dict(), indent=1))
    validate(cfg, resume=resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = args.config
        if config is None and args.resume is not None:  # continue with the run's own config
            config = _resumed_config(args.resume)
        cfg = load_config(config, args.overrides)
        if args.check:
            return _check(cfg, config, args.resume)
        validate(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    from kvpo.training.trainer import KVPOTrainer

    info = init_distributed(cfg.device)
    try:
        KVPOTrainer(cfg, resume=args.resume, info=info).train()
    finally:
        shutdown(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
