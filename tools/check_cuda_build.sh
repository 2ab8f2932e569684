#!/usr/bin/env bash
# Builds the extension against pip's CUDA build of torch, on a machine without a GPU:
# 1. a venv ($KVPO_CUDA_VENV, default $KVPO_CUDA_WORK/venv) gets torch==<the version of the
#    current python's torch, without its +local tag> from PyPI's default index (the CUDA wheel
#    and its nvidia-* packages: several GB, so this is not part of CI), plus setuptools, wheel,
#    ninja and numpy; a venv that already has that CUDA build is reused;
# 2. a copy of the working tree ($KVPO_CUDA_WORK/src, default /tmp/kvpo-cuda/src) is built with
#    KVPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=1 (log: $KVPO_CUDA_WORK/build.log),
#    so the repository's own in-place kvpo_kernels/_C (the CPU build the tests use) is untouched;
# 3. that build is imported in the venv (no GPU needed), a CPU op is run through it, and every
#    kvpo_C op is listed with its CPU and CUDA registrations; the CUDA ones must be exactly those
#    that csrc/torch/cuda/*.cpp register.
# pip runs with --isolated so that this machine's pip configuration (local find-links with a CPU
# wheel, a constraints file) cannot swap in another build of torch.
# Usage: tools/check_cuda_build.sh    (nvcc on PATH or CUDA_HOME; PYTHON picks the reference torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORK=${KVPO_CUDA_WORK:-/tmp/kvpo-cuda}
VENV=${KVPO_CUDA_VENV:-$WORK/venv}
INDEX=${KVPO_CUDA_INDEX:-https://pypi.org/simple}
mkdir -p "$WORK"

version=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
echo "== torch $version (the version of $("$PYTHON" -c 'import torch; print(torch.__version__)') in $PYTHON)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
vpy=$VENV/bin/python
pip_() { "$vpy" -m pip --isolated --disable-pip-version-check "$@"; }
have=$("$vpy" -c "import torch; print(torch.__version__.split('+')[0], torch.version.cuda)" \
  2>/dev/null || true)
t0=$SECONDS
if [ "$have" = "$version None" ]; then pip_ uninstall -y torch; fi  # a CPU build
if [ "$have" = "$version None" ] || [ "${have%% *}" != "$version" ]; then
  pip_ install --index-url "$INDEX" "torch==$version"
fi
pip_ install --index-url "$INDEX" setuptools wheel ninja numpy >/dev/null
echo "venv $VENV ready in $((SECONDS - t0)) s:" \
  "$("$vpy" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)")"
cuda=$("$vpy" -c "import torch; print(torch.version.cuda)")
[ "$cuda" != None ] || { echo "the venv's torch is not a CUDA build"; exit 1; }

echo "== build (sm_80, sm_90)"
src=$WORK/src
rm -rf "$src"; mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$src"
t0=$SECONDS
if (cd "$src" && KVPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-1} \
    nice -n 10 "$vpy" setup.py build_ext --inplace) > "$WORK/build.log" 2>&1; then
  echo "build ok in $((SECONDS - t0)) s (log: $WORK/build.log)"
else
  tail -n 40 "$WORK/build.log"
  echo "build FAILED after $((SECONDS - t0)) s (log: $WORK/build.log)"; exit 1
fi
grep '^kvpo: ' "$WORK/build.log" || true  # setup.py's report of the toolkit and headers
echo "device code: $(grep -o 'code=sm_[0-9]*' "$WORK/build.log" | sort -u | tr '\n' ' ')"
for f in "$src"/csrc/cuda/*.cu; do
  grep -q "$(basename "$f")" "$WORK/build.log" || { echo "$f was not compiled"; exit 1; }
done

echo "== import and registrations"
expected=$(cat csrc/torch/cuda/*.cpp | grep -o 'm\.impl("[a-z_0-9]*"' | sed 's/m\.impl("//; s/"//' |
  sort | tr '\n' ' ')
(cd "$WORK" && "$vpy" - "$src" "$expected" <<'EOF'
import sys

import torch

src, expected = sys.argv[1], set(sys.argv[2].split())
sys.path.insert(0, src)
import kvpo_kernels._C as C  # noqa: E402

print(f"imported {C.__file__}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU present: {torch.cuda.is_available()}")
print(f"cuda_built() = {C.cuda_built()}, OpenMP threads = {C.openmp_threads()}")
pages = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 3, 2, 4)
want = pages.clone()
want[0, 2] = want[0, 0]
torch.ops.kvpo_C.copy_pages(pages, torch.tensor([0], dtype=torch.int32), torch.tensor([2], dtype=torch.int32))
print(f"CPU copy_pages through this build: {'ok' if torch.equal(pages, want) else 'WRONG'}")
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kvpo_C::"))
print(f"{'op':<34}CPU    CUDA")
cuda_ops, ok = set(), C.cuda_built() and torch.equal(pages, want)
for op in ops:
    cpu, cuda = (torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in ("CPU", "CUDA"))
    print(f"{op:<34}{'yes' if cpu else 'NO':<7}{'yes' if cuda else '-'}")
    ok &= cpu
    if cuda:
        cuda_ops.add(op.split("::")[1])
if cuda_ops != expected:
    print(f"CUDA registrations {sorted(cuda_ops)} differ from csrc/torch/cuda: {sorted(expected)}")
    ok = False
print("check_cuda_build: " + ("ok" if ok else "FAILED"))
sys.exit(0 if ok else 1)
EOF
)
