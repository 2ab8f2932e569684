"""The command line of the check: ``python -m kvpo_kernels.aot_check --help``.

``TRITON_INTERPRET=1`` turns ``@triton.jit`` kernels into interpreted functions when they are
defined, so :func:`main` runs itself again without it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from kvpo_kernels import aot_check

from .compile import _run_resumable
from .configs import ARCHS, DTYPES, GROUPS, HEAD_DIMS, KERNEL_MODULES, collect_jobs
from .report import (
    COMMAND,
    MODULE,
    load_results,
    markdown,
    print_summary,
    reproducing_command,
    versions,
    write_json,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=aot_check.__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=list(DTYPES),
        choices=DTYPES,
        help="tf32: fp32 tensors with TF32 matmuls allowed",
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument(
        "--groups",
        type=int,
        nargs="+",
        default=list(GROUPS),
        help="GQA group sizes of routed attention (1: MHA)",
    )
    parser.add_argument(
        "--kernels", nargs="+", default=list(KERNEL_MODULES), choices=KERNEL_MODULES
    )
    parser.add_argument(
        "--pickable-only",
        action="store_true",
        help="compile only the configurations the launchers can pick",
    )
    parser.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    parser.add_argument("--nice", type=int, default=10, help="niceness increment (default 10)")
    parser.add_argument(
        "--json",
        type=Path,
        help="write every result as JSON (an interrupted run resumes from <json>.partial)",
    )
    parser.add_argument("--markdown", type=Path, help="write the resource tables as Markdown")
    parser.add_argument(
        "--report-from",
        type=Path,
        help="report a run saved with --json instead of compiling (other options ignored)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run (or, with ``--report-from``, report) the check; 1 when it fails, else 0."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", MODULE, *argv], env=env).returncode
    args = _parser().parse_args(argv)

    start = time.perf_counter()
    if args.report_from:
        results, info, command = load_results(args.report_from)
    else:
        os.nice(args.nice)
        from kvpo_kernels import registry

        if registry.TRITON_INTERPRET:
            raise RuntimeError("TRITON_INTERPRET was set when kvpo_kernels was imported")
        jobs = collect_jobs(
            args.arch, args.dtypes, args.head_dims, args.kernels, args.groups, args.pickable_only
        )
        results = _run_resumable(jobs, args.jobs, args.json)
        info, command = versions(), reproducing_command(argv)
    elapsed = time.perf_counter() - start
    if args.json and not args.report_from:
        write_json(args.json, results, info, command)
    if args.markdown:
        args.markdown.write_text(markdown(results, info, command))
    return 1 if print_summary(results, bool(args.report_from), elapsed) else 0


if __name__ == "__main__":
    sys.exit(main())
