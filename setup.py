"""Build of the compiled extension ``kvpo_kernels._C``.

The C++/OpenMP CPU kernels are always built. The CUDA kernels are built as well when torch is a
CUDA build and a CUDA toolkit is found (``KVPO_BUILD_CUDA=0`` turns them off, ``=1`` makes a
missing toolkit an error). ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` (A100, H100/H200).
"""

import glob
import os
import shutil
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, torch's guess, nvcc on PATH, /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def want_cuda():
    flag = os.environ.get("KVPO_BUILD_CUDA")
    import torch

    if flag == "0":
        return False
    home = find_cuda_home()
    if torch.version.cuda is None or home is None:
        if flag == "1":
            sys.exit(
                f"KVPO_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r} "
                f"and CUDA toolkit={home!r}: need a CUDA build of torch and nvcc"
            )
        return False
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return True


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cuda = want_cuda()
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/torch/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not cuda:
        return cpp_extension.CppExtension(
            "kvpo_kernels._C",
            srcs,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    srcs += sources("csrc/cuda/*.cu") + sources("csrc/torch/cuda/*.cpp")
    return cpp_extension.CUDAExtension(
        "kvpo_kernels._C",
        srcs,
        include_dirs=include_dirs,
        define_macros=[("KVPO_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx + ["-DKVPO_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
