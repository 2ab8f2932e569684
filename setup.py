"""Build of the compiled extension ``kvpo_kernels._C``.

The C++/OpenMP CPU kernels are always built. The CUDA kernels are built as well when torch is a
CUDA build and a CUDA toolkit is found (``KVPO_BUILD_CUDA=0`` turns them off, ``=1`` makes a
missing toolkit an error). ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` (A100, H100/H200).
tools/cuda_toolkit.py finds the toolkit and the CUDA math-library headers.
"""

import glob
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_toolkit  # noqa: E402  (tools/cuda_toolkit.py: finds the toolkit and math headers)


def cuda_home():
    """The toolkit root when the CUDA kernels are built (then set for torch's build), else None."""
    flag = os.environ.get("KVPO_BUILD_CUDA")
    import torch

    if flag == "0" or (torch.version.cuda is None and flag != "1"):
        return None
    rejected = []
    home = cuda_toolkit.find_cuda_home(rejected=rejected)
    for line in rejected:
        print(f"kvpo: passed over {line}")
    if torch.version.cuda is None or home is None:
        if flag == "1":
            missing = []
            if torch.version.cuda is None:
                missing.append(f"torch {torch.__version__} is not a CUDA build")
            if home is None:
                missing.append("no CUDA toolkit (bin/nvcc and its headers) was found")
            sys.exit("KVPO_BUILD_CUDA=1 but " + " and ".join(missing))
        return None
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"kvpo: CUDA toolkit {home}")
    return home


def math_headers(home):
    """Host flags adding the nvidia pip packages' CUDA math headers that the toolkit lacks."""
    import torch

    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    dirs = cuda_toolkit.math_include_dirs(home, [site])
    for d in dirs:
        print(f"kvpo: CUDA math headers from {d}")
    # searched after the toolkit's own include directory, so they never shadow its headers
    return [flag for d in dirs for flag in ("-idirafter", d)]


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    home = cuda_home()
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/torch/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if home is None:
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
            "cxx": cxx + ["-DKVPO_WITH_CUDA"] + math_headers(home),
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
