"""Ahead-of-time compile check of the Triton kernels, on a machine without a GPU.

Every Triton kernel is compiled, in every configuration its launcher can give it, by Triton's own
compiler (``triton.compile`` of an ``ASTSource``, then the ``ptxas`` shipped in the Triton wheel)
for sm_80 (A100) and sm_90 (H100/H200). For each configuration it reports the shared memory
(``metadata.shared``), the registers per thread and the spills (``ptxas -v``), whether the dots
use tensor cores (``wgmma`` / ``mma`` in the PTX), and whether a block can launch on the GPU:

- shared memory <= what a block may opt into (227 KiB on sm_90, 163 KiB on sm_80);
- registers <= 255 per thread and ``num_warps * 32 * regs`` (allocated per warp in units of 256)
  <= 65536 per block; ``num_warps * 32`` <= 1024 threads.

The configurations are not listed here by hand: the real launchers
(:mod:`kvpo_kernels.ops.triton`) are called with ``meta`` tensors of representative shapes
(dtypes, head dims 64 and 128, MHA and GQA, contiguous and strided TVE items, page rows of 64 to
1024 elements) while ``Autotuner.run`` and ``JITFunction.run`` are replaced by recorders. A
recorded autotuned launch expands to all of the kernel's autotune configs; those its
``early_config_prune`` keeps for the arch (compute capability and shared-memory limit) are
*pickable*, the others *pruned*. The argument specialisation (pointer and integer divisibility
by 16, integers equal to 1) is Triton's own (``native_specialize_impl``), as in a real launch
with 16-byte aligned tensors. *tf32* is fp32 tensors with TF32 allowed for fp32 matmuls.

The check fails (exit status 1) when a pickable configuration cannot launch or does not compile,
when a launcher's pruning fails, or when a kernel compiles to more shared memory than the bound
routed attention prunes by (:func:`kvpo_kernels.ops.triton.routed_attention.shared_memory_bound`;
a device whose limit lay between the two would be offered a config that cannot launch). Pruned
configurations are compiled too, unless ``--pickable-only``, to show why they are pruned.

    python -m kvpo_kernels.aot_check [--arch 80 90] [--dtypes bf16 fp16 fp32 tf32 fp64]
        [--head-dims 64 128] [--groups 1 4] [--kernels routed_attention tve write_pages
        copy_pages] [--pickable-only] [--jobs 1] [--nice 10] [--json out.json]
        [--markdown out.md]

Tested with Triton 3.6.0 and 3.7.1.

``TRITON_INTERPRET=1`` turns ``@triton.jit`` kernels into interpreted functions when they are
defined, so ``main`` runs itself again without it.

The package: :mod:`.configs` enumerates the kernel x launch configurations (per dtype, head dim,
GQA group and autotune config), :mod:`.compile` compiles them and reads shared memory,
registers and spills, :mod:`.limits` holds the A100/H100 limits and the verdicts,
:mod:`.report` writes the tables (text, Markdown, JSON) and reads a saved run back, and
:mod:`.__main__` is the command line. Importing it imports torch, not Triton.
"""

from .compile import compile_job, parse_ptxas_log, run_jobs
from .configs import ARCHS, DTYPES, GROUPS, HEAD_DIMS, KERNEL_MODULES, Job, collect_jobs, scenarios
from .limits import LIMITS, Limits, Result, check_limits, failures
from .report import load_results, markdown, reproducing_command, summary_rows, versions

__all__ = [
    "ARCHS",
    "DTYPES",
    "GROUPS",
    "HEAD_DIMS",
    "KERNEL_MODULES",
    "LIMITS",
    "Job",
    "Limits",
    "Result",
    "check_limits",
    "collect_jobs",
    "compile_job",
    "failures",
    "load_results",
    "markdown",
    "parse_ptxas_log",
    "reproducing_command",
    "run_jobs",
    "scenarios",
    "summary_rows",
    "versions",
]
