"""tools/cuda_toolkit.py: the CUDA toolkit and math-header lookup of setup.py, on real trees."""

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_toolkit", _ROOT / "tools" / "cuda_toolkit.py")
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)

RUNTIME_HEADER = "cuda_runtime_api.h"


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _toolkit(root: Path, headers=True, include="include") -> Path:
    """A toolkit tree whose bin/nvcc answers --dryrun like the real one (TOP on stderr) and
    appends each call's arguments to root/calls."""
    _script(
        root / "bin" / "nvcc",
        "#!/bin/sh\n"
        f'echo "$*" >> "{root}/calls"\n'
        'here=$(cd "$(dirname "$0")" && pwd)\n'
        'echo "#\\$ _HERE_=$here" >&2\n'
        'echo "#\\$ TOP=$here/.." >&2\n'
        'echo "#\\$ INCLUDES=\\"-I$here/../include\\"" >&2\n',
    )
    if headers:
        (root / include).mkdir(parents=True)
        (root / include / RUNTIME_HEADER).write_text("#pragma once\n")
    return root


def _wrapper(bindir: Path, target: Path) -> Path:
    return _script(bindir / "nvcc", f'#!/bin/sh\nexec "{target}" "$@"\n')


def _find(tmp_path, path, environ=None):
    rejected = []
    home = ct.find_cuda_home(
        environ=environ or {}, path=str(path), default=str(tmp_path / "absent"), rejected=rejected
    )
    return home, rejected


def test_wrapper_script_resolves_to_the_toolkit_it_runs(tmp_path):
    real = _toolkit(tmp_path / "opt" / "cuda-12.9")
    _wrapper(tmp_path / "usr" / "bin", real / "bin" / "nvcc")
    home, rejected = _find(tmp_path, tmp_path / "usr" / "bin")
    assert home == str(tmp_path / "opt" / "cuda-12.9")
    # the wrapper's own prefix has bin/nvcc but no headers: rejected, then --dryrun asked
    assert rejected == [
        f"{tmp_path / 'usr'} (nvcc on PATH ({tmp_path / 'usr' / 'bin' / 'nvcc'})): "
        f"no include/{RUNTIME_HEADER} (nor targets/*/include/{RUNTIME_HEADER})"
    ]
    assert (real / "calls").read_text() == "--dryrun -c -x cu /dev/null -o /dev/null\n"
    assert ct.nvcc_top(str(tmp_path / "usr" / "bin" / "nvcc")) == str(real)


def test_symlinked_nvcc_resolves_without_running_it(tmp_path):
    real = _toolkit(tmp_path / "cuda-12.4")
    (tmp_path / "bin").mkdir()
    os.symlink(real / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    home, rejected = _find(tmp_path, tmp_path / "bin")
    assert (home, rejected) == (str(real), [])
    assert not (real / "calls").exists()


def test_nvcc_without_headers_is_rejected(tmp_path):
    bare = _toolkit(tmp_path / "bare", headers=False)
    home, rejected = _find(tmp_path, bare / "bin", environ={"CUDA_HOME": str(tmp_path / "none")})
    assert home is None
    assert rejected == [
        f"{tmp_path / 'none'} (CUDA_HOME): no executable bin/nvcc",
        f"{bare} (nvcc on PATH ({bare / 'bin' / 'nvcc'})): "
        f"no include/{RUNTIME_HEADER} (nor targets/*/include/{RUNTIME_HEADER})",
        f"{bare} (`{bare / 'bin' / 'nvcc'} --dryrun`): "
        f"no include/{RUNTIME_HEADER} (nor targets/*/include/{RUNTIME_HEADER})",
        f"{tmp_path / 'absent'} (default): no executable bin/nvcc",
    ]


def test_cuda_home_first_and_targets_layout(tmp_path):
    env_home = _toolkit(tmp_path / "env-cuda", include="targets/x86_64-linux/include")
    path_home = _toolkit(tmp_path / "path-cuda")
    assert ct.toolkit_include(str(env_home)) == str(env_home / "targets/x86_64-linux/include")
    assert ct.toolkit_include(str(path_home)) == str(path_home / "include")
    home, rejected = _find(tmp_path, path_home / "bin", environ={"CUDA_HOME": str(env_home)})
    assert (home, rejected) == (str(env_home), [])
    # a CUDA_HOME without headers falls through to nvcc on PATH
    bare = _toolkit(tmp_path / "bare", headers=False)
    home, rejected = _find(tmp_path, path_home / "bin", environ={"CUDA_PATH": str(bare)})
    assert home == str(path_home)
    assert len(rejected) == 1 and rejected[0].startswith(f"{bare} (CUDA_PATH): no include/")


def test_nvcc_that_fails_or_prints_no_top(tmp_path):
    silent = _script(tmp_path / "silent" / "nvcc", "#!/bin/sh\nexit 1\n")
    assert ct.nvcc_top(str(silent)) is None
    assert ct.nvcc_top(str(tmp_path / "missing" / "nvcc")) is None


def _headers(d: Path, *names):
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_text("#pragma once\n")


def test_math_headers_from_nvidia_packages(tmp_path):
    home = _toolkit(tmp_path / "cuda")
    site = tmp_path / "site-packages"
    nv = site / "nvidia"
    _headers(nv / "cublas" / "include", "cublas_v2.h", "cublasLt.h")
    _headers(nv / "cusparse" / "include", "cusparse.h")
    _headers(nv / "cusolver" / "include", "cusolverDn.h", "cusolver_common.h")
    _headers(nv / "cuda_runtime" / "include", RUNTIME_HEADER)
    dirs = ct.math_include_dirs(str(home), [str(tmp_path / "empty"), str(site)])
    assert dirs == [
        str(nv / "cublas" / "include"),
        str(nv / "cusparse" / "include"),
        str(nv / "cusolver" / "include"),
    ]
    # what the toolkit has is not looked up
    _headers(home / "include", "cusparse.h")
    assert str(nv / "cusparse" / "include") not in ct.math_include_dirs(str(home), [str(site)])
    _headers(home / "include", "cublas_v2.h", "cublasLt.h", "cusolverDn.h", "cusolver_common.h")
    assert ct.math_include_dirs(str(home), [str(site)]) == []


def test_math_headers_in_one_merged_cu13_directory(tmp_path):
    home = _toolkit(tmp_path / "cuda")
    merged = tmp_path / "site" / "nvidia" / "cu13" / "include"
    _headers(merged, *ct.MATH_HEADERS, RUNTIME_HEADER)
    assert ct.math_include_dirs(str(home), [str(tmp_path / "site")]) == [str(merged)]
    # a header found nowhere leaves nothing to add
    assert ct.math_include_dirs(str(home), [str(tmp_path / "empty")]) == []


_MACHINE_TOOLKIT = "/usr/local/cuda-13.0"


@pytest.mark.skipif(
    shutil.which("nvcc") is None or not os.path.isfile(f"{_MACHINE_TOOLKIT}/bin/nvcc"),
    reason=f"needs nvcc on PATH and the toolkit at {_MACHINE_TOOLKIT} (this project's machines)",
)
def test_machine_nvcc_resolves_to_its_toolkit():
    env = {"PATH": os.environ["PATH"]}
    assert ct.find_cuda_home(environ=env) == _MACHINE_TOOLKIT
    assert ct.nvcc_top(shutil.which("nvcc")) == _MACHINE_TOOLKIT
    assert ct.toolkit_include(_MACHINE_TOOLKIT) == f"{_MACHINE_TOOLKIT}/include"
