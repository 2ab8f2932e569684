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
import dataclasses
import json
import sys
from pathlib import Path

import torch

from kvpo.training import authors_config
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
        help="validate the config, print it resolved (a KVPO authors' file: its mapping table "
        "too; paths missing on this machine are listed, not fatal), and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _resumed_config(resume: str) -> Path | None:
    try:
        saved = resolve_checkpoint(resume).parent.parent / "config.yaml"
    except FileNotFoundError:
        return None  # validate() reports the missing checkpoint
    return saved if saved.is_file() else None


_PATHS = ("generator_ckpt", "lora_ckpt", "data_path", "eval_data_path")


def _check_paths(cfg, resume: str | None) -> list[str]:
    """``--check``: validate; paths of the config that do not exist on this machine (the
    checkpoints and prompt files of a config written for another machine, such as the KVPO
    authors' files) are returned as problems to print instead of stopping the check. Every
    other problem (and a path that exists but is wrong) still raises."""
    try:
        validate(cfg, resume=resume)
        return []
    except ConfigError as err:
        gone = {k: None for k in _PATHS if getattr(cfg, k) and not Path(getattr(cfg, k)).exists()}
        wan = cfg.wan_model_path
        if wan and not Path(wan).is_dir():
            gone["wan_model_path"] = None
        if not gone:
            raise
        try:
            validate(dataclasses.replace(cfg, **gone), resume=resume)
        except ConfigError:  # something else is wrong too: report every problem
            raise err from None
        return [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:]]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = args.config
        if config is None and args.resume is not None:  # continue with the run's own config
            config = _resumed_config(args.resume)
        cfg = load_config(config, args.overrides)
        if args.check:
            missing = _check_paths(cfg, args.resume)
        else:
            validate(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        table = authors_config.check_table(config)
        if table is not None:
            print(table)
        for problem in missing:
            print(f"not found on this machine (a training run stops here): {problem}")
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
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
