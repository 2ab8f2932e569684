"""The ahead-of-time Triton compile check (``kvpo_kernels.aot_check``) and the launcher pruning it
verifies.

The compiles run in subprocesses without ``TRITON_INTERPRET`` (conftest sets it on machines
without CUDA, and it turns ``@triton.jit`` kernels into interpreted functions when they are
defined). No GPU is needed: Triton compiles for sm_90 on the CPU.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

from kvpo_kernels import aot_check  # noqa: E402
from kvpo_kernels.aot_check import compile as aot_compile  # noqa: E402
from kvpo_kernels.ops.triton import routed_attention as ra  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
H100_SHARED = 227 * 1024
A100_SHARED = 163 * 1024

# ptxas -v output (the format Triton prints with TRITON_DUMP_PTXAS_LOG=1)
PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_forward_kernel' for 'sm_90a'
ptxas info    : Function properties for _forward_kernel
    9616 bytes stack frame, 30760 bytes spill stores, 42904 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 9616 bytes cumulative stack size
ptxas info    : Compile time = 4810.141 ms
"""


def _env_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_ptxas_log_is_parsed():
    assert aot_check.parse_ptxas_log(PTXAS_LOG, "_forward_kernel") == (32, 30760, 42904, 9616)
    with pytest.raises(ValueError, match="no ptxas -v report for _dq_kernel"):
        aot_check.parse_ptxas_log(PTXAS_LOG, "_dq_kernel")


def _checked(arch, shared, regs, num_warps):
    result = aot_check.Result(arch, "k", "s", "p", True, shared=shared, regs=regs)
    result.num_warps = num_warps
    aot_check.check_limits(result, aot_check.LIMITS[arch])
    return result


def test_limits_per_block():
    # the largest block that fits: all of sm_90's opt-in shared memory, 255 registers x 256 threads
    full = _checked(90, H100_SHARED, 255, 8)
    assert full.launchable and full.ctas_per_sm == 1
    assert not _checked(90, H100_SHARED + 1, 32, 4).launchable
    assert _checked(90, A100_SHARED + 1, 32, 4).launchable
    over = _checked(80, A100_SHARED + 1, 32, 4)
    assert over.problems == [f"shared memory {A100_SHARED + 1} B > {A100_SHARED} B per block"]
    assert _checked(80, 0, 256, 4).problems == ["256 registers > 255 per thread"]
    assert _checked(80, 0, 32, 64).problems == ["2048 threads > 1024 per block"]
    # occupancy: 4 warps x 32 registers -> 16 CTAs by threads and by registers
    assert _checked(90, 0, 32, 4).ctas_per_sm == 16
    # 64 KiB + 1 KiB reserved per block: 3 blocks in sm_90's 228 KiB, 2 in sm_80's 164 KiB
    assert _checked(90, 64 * 1024, 32, 4).ctas_per_sm == 3
    assert _checked(80, 64 * 1024, 32, 4).ctas_per_sm == 2


def _forward_configs():
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in (64, 128)
        for n in (32, 64)
        for w, s in ((4, 2), (8, 3))
    ]


def _kept(dtype, precision, block_d, capability, shared):
    prune = ra._prune("_forward_kernel")["early_config_prune"]
    q = torch.empty(2, 8, 4, block_d, dtype=dtype, device="meta")
    with mock.patch.object(ra, "_device_limits", lambda device: (capability, shared)):
        kept = prune(_forward_configs(), {"Q": q}, BLOCK_D=block_d, PRECISION=precision, GROUP=1)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept]


def test_pruning_per_dtype_and_head_dim():
    every = [(m, n, w) for m in (64, 128) for n in (32, 64) for w in (4, 8)]
    assert _kept(torch.bfloat16, "tf32", 128, 80, A100_SHARED) == every
    assert _kept(torch.bfloat16, "tf32", 128, 90, H100_SHARED) == every
    # fp32 in ieee precision: 8 warps only; at head dim 128 on an A100 only 64 x 32 tiles fit
    assert _kept(torch.float32, "ieee", 128, 80, A100_SHARED) == [(64, 32, 8)]
    assert _kept(torch.float32, "ieee", 64, 80, A100_SHARED) == [
        (64, 32, 8),
        (64, 64, 8),
        (128, 32, 8),
    ]
    # TF32 on an H100 at head dim 128: 64-token key blocks are pruned
    assert _kept(torch.float32, "tf32", 128, 90, H100_SHARED) == [
        (64, 32, 4),
        (64, 32, 8),
        (128, 32, 4),
        (128, 32, 8),
    ]
    # nothing fits: the smallest config is kept, and its launch will report the shortage
    assert _kept(torch.float32, "ieee", 128, 80, 16 * 1024) == [(64, 32, 8)]
    assert _kept(torch.float16, "tf32", 128, 80, 16 * 1024) == [(64, 32, 4)]


def test_fp32_precision_follows_torch():
    matmul = torch.backends.cuda.matmul
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision switch")
    q, pages = torch.empty(1, 3, 4, 72), torch.empty(2, 2, 16, 2, 72)
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert ra.fp32_precision() == "tf32"
        assert ra._common(q, pages) == dict(GROUP=2, BLOCK_D=128, PRECISION="tf32")
        matmul.fp32_precision = "ieee"
        assert ra._common(q, pages)["PRECISION"] == "ieee"
        assert ra._common(q.bfloat16(), pages.bfloat16())["PRECISION"] == "tf32"  # ignored
    finally:
        matmul.fp32_precision = before


_COMPILE = """
import dataclasses, json
from kvpo_kernels import aot_check as a

jobs = a.collect_jobs([90], ["bf16"], [128], ["tve", "routed_attention"], groups=[1])
tve = [j for j in jobs if j.kernel == "tve._sq_sum_partials_kernel"]
fwd = next(j for j in jobs if j.kernel == "routed_attention._forward_kernel"
           and j.params.endswith("BLOCK_M=64 BLOCK_N=32 w4 s2"))
index = {name: i for i, name in enumerate(fwd.fn.arg_names)}
huge = dataclasses.replace(
    fwd, params="huge", constexprs={**fwd.constexprs, (index["BLOCK_M"],): 16,
                                    (index["BLOCK_N"],): 256})
results = a.run_jobs(tve + [fwd, huge])
print(json.dumps([{**dataclasses.asdict(r), "launchable": r.launchable} for r in results]))
"""


def test_compiles_for_sm90_without_a_gpu():
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        env=_env_without_interpreter(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert [r["scenario"] for r in results] == [
        "bf16 contiguous",
        "bf16 strided",
        "bf16 D=128 MHA",
        "bf16 D=128 MHA",
    ]
    tve, fwd, huge = results[:2], results[2], results[3]
    for r in tve:  # a reduction: a little shared memory, no tensor cores, no spills
        assert r["launchable"] and r["pickable"]
        assert 0 < r["shared"] <= 1024 and 0 < r["regs"] <= 255
        assert r["tensor_cores"] == "-" and r["spill_stores"] == r["spill_loads"] == 0
    # bf16 attention on sm_90: wgmma, whose k and v operands (32 x 128 bf16 tiles) lie in
    # shared memory; within the bound the launcher prunes by
    assert fwd["launchable"] and fwd["pickable"] and fwd["tensor_cores"] == "wgmma"
    assert 2 * (32 * 128 * 2) <= fwd["shared"] <= fwd["shared_bound"] <= H100_SHARED
    assert 0 < fwd["regs"] <= 255 and fwd["ctas_per_sm"] >= 1
    # 256-token key blocks of head dim 128 need more shared memory than an H100 block may have
    assert not huge["launchable"] and huge["shared"] > H100_SHARED
    assert huge["problems"] == [f"shared memory {huge['shared']} B > {H100_SHARED} B per block"]


def test_command_line_reexecutes_without_the_interpreter(tmp_path):
    env = _env_without_interpreter()
    env["TRITON_INTERPRET"] = "1"
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["--arch", "80", "--dtypes", "fp16", "--kernels", "write_pages", "--nice", "0"]
    args += ["--json", str(out_json), "--markdown", str(out_md)]
    run = subprocess.run(
        [sys.executable, "-m", "kvpo_kernels.aot_check", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out_json.read_text())["results"]
    # BLOCK = min(1024, next_pow2(H_kv * D)) over the page rows checked: 64 .. 1024
    assert [r["params"] for r in results] == [f"BLOCK={b} w4 s3" for b in (64, 128, 256, 512, 1024)]
    assert all(r["launchable"] and r["arch"] == 80 and r["shared"] == 0 for r in results)
    text = out_md.read_text()
    assert "## sm_80 (A100), every configuration" in text
    assert "write_pages._write_pages_kernel" in text
    # a saved run renders the same tables again, with the command that reproduces it
    saved, versions, command = aot_check.load_results(out_json)
    assert command == "python -m kvpo_kernels.aot_check " + " ".join(args[:6])
    assert aot_check.markdown(saved, versions, command) == text


def test_reproducing_command_drops_output_options():
    argv = ["--arch", "90", "--jobs", "2", "--json", "a.json", "--markdown=b.md", "--pickable-only"]
    assert aot_check.reproducing_command(argv) == (
        "python -m kvpo_kernels.aot_check --arch 90 --pickable-only"
    )


def test_interrupted_run_resumes_from_its_partial_file(tmp_path, monkeypatch):
    jobs = [
        aot_check.Job(90, "m.k", "bf16", None, {}, {}, {}, {}, f"BLOCK={b}", True)
        for b in (16, 32, 64)
    ]
    path = tmp_path / "run.json"
    before = aot_check.Result(90, "m.k", "bf16", "BLOCK=16", True, shared=7, regs=9)
    (tmp_path / "run.json.partial").write_text(json.dumps(dataclasses.asdict(before)) + "\n")
    compiled = []

    def run_jobs(todo, workers, progress):
        out = []
        for job in todo:
            compiled.append(job.params)
            out.append(aot_check.Result(90, job.kernel, job.scenario, job.params, True, shared=1))
            progress(out[-1], len(out), len(todo))
        return out

    monkeypatch.setattr(aot_compile, "run_jobs", run_jobs)
    results = aot_compile._run_resumable(jobs, 1, path)
    assert compiled == ["BLOCK=32", "BLOCK=64"]
    assert [(r.params, r.shared) for r in results] == [
        ("BLOCK=16", 7),
        ("BLOCK=32", 1),
        ("BLOCK=64", 1),
    ]
    assert not (tmp_path / "run.json.partial").exists()  # removed once the run is complete
