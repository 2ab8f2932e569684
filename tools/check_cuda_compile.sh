#!/usr/bin/env bash
# Compiles every csrc/**/*.cu with `nvcc -c` for sm_80 and sm_90, without torch: the CUDA
# sources include only CUDA headers and csrc/include. Usage: tools/check_cuda_compile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
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
