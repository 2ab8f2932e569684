"""The reports of a run: the summary and failures printed as text, the resource tables as
Markdown, every result as JSON, and a saved JSON run read back (``--report-from``)."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from .limits import LIMITS, Result, failure_reasons, failures

MODULE = "kvpo_kernels.aot_check"
COMMAND = f"python -m {MODULE}"


def _git(root: Path, *args: str, check: bool = False) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=check
    ).stdout.strip()


def versions() -> dict:
    """Triton, torch and ptxas versions and the commit of the kernels compiled."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    info = {"triton": triton.__version__, "torch": torch.__version__}
    try:
        out = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True)
        info["ptxas"] = re.findall(r"release ([\d.]+)", out.stdout)[0]
    except (OSError, IndexError):
        info["ptxas"] = "unknown"
    try:
        root = Path(__file__).resolve().parents[2]
        commit = _git(root, "rev-parse", "--short=12", "HEAD", check=True)
        dirty = _git(root, "status", "--porcelain", "--", "kvpo_kernels")
        info["commit"] = commit + (" (kvpo_kernels modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def summary_rows(results: list[Result]) -> list[dict]:
    """Per arch, kernel and dtype: counts, spills and the largest resources."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.kernel, r.scenario.split()[0]), []).append(r)
    rows = []
    for (arch, kernel, dtype), rs in groups.items():
        picked = [r for r in rs if r.pickable]
        compiled = [r for r in rs if r.shared is not None]
        rows.append(
            {
                "arch": arch,
                "kernel": kernel,
                "dtype": dtype,
                "configs": len(rs),
                "pickable": len(picked),
                "pruned": len(rs) - len(picked),
                "not_launchable": sum(not r.launchable for r in rs),
                "pickable_not_launchable": sum(not r.launchable for r in picked),
                "spilling": sum(r.spills for r in rs),
                "pickable_spilling": sum(r.spills for r in picked),
                "max_shared": max((r.shared for r in compiled), default=0),
                "max_regs": max((r.regs for r in compiled), default=0),
                "tensor_cores": "/".join(sorted({r.tensor_cores for r in compiled})),
                "seconds": round(sum(r.seconds for r in rs), 1),
            }
        )
    return rows


def _or_dash(n) -> str:
    return "-" if n is None else str(n)


def _fp32_paragraph(results: list[Result]) -> list[str]:
    """What the tables say about fp32 attention, with the counts of this run."""
    attention = [r for r in results if r.shared_bound is not None]
    ieee = [r for r in attention if "PRECISION=ieee" in r.params]
    tf32 = [r for r in attention if r.scenario.startswith("tf32")]
    if not ieee and not tf32:
        return []
    lines = ["", "## fp32 attention on a GPU", ""]
    if ieee:
        picked = [r for r in ieee if r.pickable]
        too_big = sum(not r.launchable for r in ieee if r.shared is not None)
        shortage = (
            f", and {too_big} need more shared memory than a block may have (pruned)"
            if too_big
            else ""
        )
        starved = [r for r in ieee if r.regs == 32 and r.spills]
        worst = max((r.spill_stores + r.spill_loads for r in ieee if r.spills), default=0)
        detail = (
            f" ptxas gives {len(starved)} of them only 32 registers; the largest spill traffic "
            f"is {worst} B (stores + loads)."
            if starved
            else ""
        )
        lines.append(
            "With PyTorch's default fp32 matmul precision the attention dots of fp32 tensors run "
            "in ieee precision: exact fp32 FMAs on CUDA cores, no tensor cores. "
            f"{sum(r.spills for r in ieee)} of the {len(ieee)} ieee configurations compiled here "
            f"spill registers ({sum(r.spills for r in picked)} of the {len(picked)} "
            f"pickable){shortage}.{detail} The pruning tries only their 8-warp configurations, "
            "which spill least. fp32 attention works on a GPU, but slowly."
        )
        lines.append("")
    lines.append(
        'Setting `torch.backends.cuda.matmul.fp32_precision = "tf32"` (or '
        '`torch.set_float32_matmul_precision("high")`) makes the Triton attention kernels '
        "compute fp32 dots in TF32 on tensor cores (10-bit mantissa products, fp32 "
        "accumulation), as PyTorch's own fp32 matmuls do under that setting; the *tf32* rows "
        "below are those kernels. bf16, the dtype of the models' real configs, is the fast "
        "path."
    )
    return lines


def markdown(results: list[Result], info: dict, command: str) -> str:
    """The resource tables of ``results``: a summary, then every configuration per arch."""
    limits = "; ".join(
        f"sm_{a} ({lim.gpu}): {lim.shared_per_block // 1024} KiB of shared memory, "
        f"({lim.shared_per_block} B), {lim.regs_per_thread} registers per thread, "
        f"{lim.regs_per_block} per block"
        for a, lim in LIMITS.items()
    )
    lines = [
        "# Triton kernel resources (ahead-of-time compile)",
        "",
        f"Generated by `{command}` at commit {info['commit']} with Triton {info['triton']} "
        f"(ptxas {info['ptxas']}) and torch {info['torch']}, on a machine without a GPU; "
        "`kvpo_kernels/aot_check/__init__.py` describes the method. Every configuration the "
        "launchers can give a kernel is compiled for each arch and checked against its limits "
        f"per thread block ({limits}).",
        "",
        "- *pickable*: routed attention's autotune pruning keeps the configuration on that arch "
        "(its shared-memory bound fits the device); pruned ones are listed to show why, *would "
        "fit* when the bound was cautious. The check fails if a pickable configuration cannot "
        "launch or a kernel exceeds the bound.",
        "- *spill st/ld*: ptxas's spill stores / loads in bytes; *tensor cores*: `wgmma` "
        "(sm_90), `mma` (sm_80) or none; *CTAs/SM*: the occupancy the limits allow.",
        "- *launched as*: dtype (*tf32*: fp32 tensors with TF32 matmuls allowed), head dim, MHA "
        "or GQA group, TVE layout, page row size.",
        *_fp32_paragraph(results),
        "",
        "## Summary",
        "",
        "| arch | kernel | dtype | configs | pickable | pruned | cannot launch (pickable) "
        "| spilling (pickable) | max shared B | max regs | tensor cores | compile s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in summary_rows(results):
        lines.append(
            f"| sm_{s['arch']} | {s['kernel']} | {s['dtype']} | {s['configs']} | {s['pickable']} "
            f"| {s['pruned']} | {s['not_launchable']} ({s['pickable_not_launchable']}) "
            f"| {s['spilling']} ({s['pickable_spilling']}) | {s['max_shared']} "
            f"| {s['max_regs']} | {s['tensor_cores']} | {s['seconds']} |"
        )
    for arch in sorted({r.arch for r in results}):
        lines += [
            "",
            f"## sm_{arch} ({LIMITS[arch].gpu}), every configuration",
            "",
            "| kernel | launched as | constexprs, warps, stages | pickable | shared B "
            "| bound B | regs | spill st/ld B | tensor cores | CTAs/SM | launches | compile s |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |",
        ]
        for r in (r for r in results if r.arch == arch):
            spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
            verdict = "yes" if r.launchable else "**no**: " + "; ".join(r.problems)
            lines.append(
                f"| {r.kernel} | {r.scenario} | {r.params} | {r.picked} | {_or_dash(r.shared)} "
                f"| {_or_dash(r.shared_bound)} | {_or_dash(r.regs)} | {spill} "
                f"| {r.tensor_cores or '-'} | {_or_dash(r.ctas_per_sm)} | {verdict} "
                f"| {r.seconds:.1f} |"
            )
    return "\n".join(lines) + "\n"


_OUTPUT_OPTIONS = ("--json", "--markdown", "--report-from", "--jobs", "--nice")


def reproducing_command(argv: list[str]) -> str:
    """The command line of a run without the options that do not change its results."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OUTPUT_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _OUTPUT_OPTIONS)):
            kept.append(arg)
    return " ".join([COMMAND, *kept])


def load_results(path: Path) -> tuple[list[Result], dict, str]:
    """``(results, versions, command)`` of a run saved with ``--json``."""
    saved = json.loads(path.read_text())
    results = [Result.from_dict(r) for r in saved["results"]]
    return results, saved["versions"], reproducing_command(saved["command"].split()[3:])


def write_json(path: Path, results: list[Result], info: dict, command: str) -> None:
    """Every result, with its verdicts, the versions and the command, as :func:`load_results`
    reads them back."""
    path.write_text(
        json.dumps(
            {
                "versions": info,
                "command": command,
                "results": [
                    {**asdict(r), "launchable": r.launchable, "above_bound": r.above_bound}
                    for r in results
                ],
            },
            indent=1,
        )
    )


def print_summary(results: list[Result], reported: bool, elapsed: float) -> list[Result]:
    """Print a line per arch, kernel and dtype, then the failures; return the failures."""
    print()
    for s in summary_rows(results):
        print(
            f"sm_{s['arch']} {s['kernel']} {s['dtype']}: {s['configs']} configs, "
            f"{s['pickable']} pickable, {s['pruned']} pruned, {s['not_launchable']} cannot "
            f"launch ({s['pickable_not_launchable']} pickable), {s['spilling']} spill "
            f"({s['pickable_spilling']} pickable), max shared {s['max_shared']} B, max regs "
            f"{s['max_regs']}, tensor cores {s['tensor_cores']}, {s['seconds']} s"
        )
    bad = failures(results)
    for r in bad:
        print(
            f"FAIL sm_{r.arch} {r.kernel} {r.scenario} {r.params}: {'; '.join(failure_reasons(r))}"
        )
    print(
        f"{len(results)} configurations {'reported' if reported else 'compiled'} in "
        f"{elapsed:.0f} s; {len(bad)} failures (pickable configurations that cannot launch, "
        "kernels above their pruning bound)"
    )
    return bad
