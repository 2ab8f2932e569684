"""Where the CUDA toolkit and the CUDA math-library headers are, for setup.py's extension build.

A toolkit root counts only when it has ``bin/nvcc`` and the runtime headers
(``include/cuda_runtime_api.h`` or ``targets/*/include/cuda_runtime_api.h``). An ``nvcc`` on PATH
may be a symlink or a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) far from its
toolkit: it is followed with ``realpath``, then asked with ``nvcc --dryrun``, whose ``#$ TOP=``
line names the root of the toolkit it belongs to.

torch's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers, which a minimal toolkit
lacks; a pip-installed CUDA torch brings them in its ``nvidia`` packages
(``site-packages/nvidia/*/include``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

RUNTIME_HEADER = "cuda_runtime_api.h"
# what ATen/cuda/CUDAContext.h (through CUDAContextLight.h) includes from the math libraries
MATH_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h", "cusolver_common.h")


def toolkit_include(home: str) -> str | None:
    """The directory under ``home`` that holds the CUDA runtime headers, or None."""
    dirs = [os.path.join(home, "include")]
    dirs += sorted(glob.glob(os.path.join(glob.escape(home), "targets", "*", "include")))
    for d in dirs:
        if os.path.isfile(os.path.join(d, RUNTIME_HEADER)):
            return d
    return None


def why_not_toolkit(home: str) -> str | None:
    """None when ``home`` is a usable toolkit root, else what it lacks."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return "no executable bin/nvcc"
    if toolkit_include(home) is None:
        return f"no include/{RUNTIME_HEADER} (nor targets/*/include/{RUNTIME_HEADER})"
    return None


def nvcc_top(nvcc: str, timeout: float = 60) -> str | None:
    """The toolkit root that ``nvcc`` (or a script that runs it) reports, or None."""
    cmd = [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (run.stderr + run.stdout).splitlines():
        m = re.match(r"#\$ TOP=(.+)$", line.strip())
        if m:
            return os.path.realpath(m.group(1))
    return None


def candidates(environ=None, path: str | None = None, default: str = "/usr/local/cuda"):
    """``(source, root)`` pairs in the order they are tried (``nvcc --dryrun`` runs only when
    reached): $CUDA_HOME, $CUDA_PATH, nvcc on PATH resolved by realpath, then by its ``TOP``,
    ``default``."""
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            yield var, env[var]
    nvcc = shutil.which("nvcc", path=path if path is not None else env.get("PATH"))
    if nvcc:
        real = os.path.realpath(nvcc)
        yield f"nvcc on PATH ({nvcc})", os.path.dirname(os.path.dirname(real))
        top = nvcc_top(nvcc)
        if top:
            yield f"`{nvcc} --dryrun`", top
    yield "default", default


def find_cuda_home(
    environ=None, path: str | None = None, default: str = "/usr/local/cuda", rejected=None
):
    """The first candidate that is a toolkit root (symlinks resolved), or None.

    ``rejected`` (a list) receives a line for each candidate passed over.
    """
    for source, root in candidates(environ, path, default):
        why = why_not_toolkit(root)
        if why is None:
            return os.path.realpath(root)
        if rejected is not None:
            rejected.append(f"{root} ({source}): {why}")
    return None


def math_include_dirs(home: str, site_packages: list[str]) -> list[str]:
    """Directories of the ``nvidia`` pip packages holding the MATH_HEADERS the toolkit lacks."""
    have = toolkit_include(home)
    dirs: list[str] = []
    for header in MATH_HEADERS:
        if have and os.path.isfile(os.path.join(have, header)):
            continue
        for site in site_packages:
            found = sorted(
                glob.glob(os.path.join(glob.escape(site), "nvidia", "*", "include", header))
            )
            if found:
                d = os.path.dirname(found[0])
                if d not in dirs:
                    dirs.append(d)
                break
    return dirs
