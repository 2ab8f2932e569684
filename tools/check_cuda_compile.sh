#!/usr/bin/env bash
# 1. Compiles every csrc/**/*.cu with `nvcc -c` for sm_80 and sm_90, without torch: the CUDA
#    sources include only CUDA headers and csrc/include.
# 2. Where torch is importable (even a CPU build: its wheel ships the CUDA headers), checks the
#    syntax of the CUDA registrations csrc/torch/cuda/*.cpp (host C++ against torch's CUDA
#    headers, otherwise built only with a CUDA torch) with `c++ -fsyntax-only`. Headers of the
#    CUDA math libraries that torch's headers include and the toolkit lacks (a minimal toolkit
#    has no cuBLAS/cuSPARSE/cuSOLVER) are replaced by stubs declaring the few types they name;
#    the registrations use none of them.
# Usage: tools/check_cuda_compile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python}
command -v "$NVCC" >/dev/null || { echo "nvcc not found"; exit 1; }
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
n=0
while IFS= read -r -d '' f; do
  "$NVCC" -c -std=c++17 -O3 -DKVPO_WITH_CUDA -Icsrc/include \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    "$f" -o "$out/$(basename "$f").o"
  echo "nvcc ok: $f"; n=$((n + 1))
done < <(find csrc -name '*.cu' -print0 | sort -z)
[ "$n" -gt 0 ] || { echo "no CUDA sources found under csrc/"; exit 1; }
echo "compiled $n CUDA sources for sm_80 and sm_90 with $("$NVCC" --version | tail -1)"

torch_includes=$("$PYTHON" -c "from torch.utils import cpp_extension as c
print(' '.join('-isystem ' + p for p in c.include_paths()))" 2>/dev/null) || {
  echo "torch not importable: CUDA registrations (csrc/torch/cuda/*.cpp) not checked"; exit 0; }
echo '#include <cuda_runtime_api.h>' > "$out/probe.cu"
"$NVCC" -x cu -M "$out/probe.cu" -o "$out/probe.d"
cuda_include=$(dirname "$(tr ' \\' '\n\n' < "$out/probe.d" | grep -m1 '/cuda_runtime_api.h$')")
stubs="$out/stubs"; mkdir -p "$stubs/c10/cuda/impl"
stub() { [ -e "$cuda_include/$1" ] || printf '#pragma once\n%s\n' "$2" > "$stubs/$1"; }
stub cublas_v2.h 'typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;'
stub cublasLt.h 'typedef struct cublasLtContext* cublasLtHandle_t;'
stub cusparse.h 'typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;'
stub cusolverDn.h 'typedef struct cusolverDnContext* cusolverDnHandle_t;'
stub cusolver_common.h 'typedef int cusolverStatus_t;'
# written by torch's CMake into CUDA builds only
printf '#pragma once\n' > "$stubs/c10/cuda/impl/cuda_cmake_macros.h"
m=0
for f in csrc/torch/cuda/*.cpp; do
  # shellcheck disable=SC2086  # torch_includes is a list of -isystem flags
  "${CXX:-c++}" -std=c++17 -fsyntax-only -DKVPO_WITH_CUDA -Icsrc/include $torch_includes \
    -isystem "$cuda_include" -isystem "$stubs" "$f"
  echo "host syntax ok: $f"; m=$((m + 1))
done
echo "checked $m CUDA registrations against torch's headers"
