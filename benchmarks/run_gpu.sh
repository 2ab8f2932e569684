#!/usr/bin/env bash
# The GPU side in one time-boxed call that fits a 600-second device command (docs/gpu.md): for a
# lent NVIDIA machine with a CUDA build of torch, Triton and nvcc.
#   bash benchmarks/run_gpu.sh      # from anywhere; results and logs go to $OUT (default below)
# Parts, ordered by value, each under `timeout` with its budget in seconds, all under one deadline
# (KVPO_GPU_DEADLINE_S, default 540 s after the start: a part gets at most the time left less a
# 20 s margin, and is skipped when that is under 15 s). A part that fails does not stop the next.
#   setup  30  wheels carried in .whl/ installed into /tmp/site (put on PYTHONPATH); versions
#   build 180  kvpo_kernels._C with its CUDA kernels for this GPU's arch only, MAX_JOBS=16
#   tests  90  tests/kvpo_kernels on the GPU (8 pytest-xdist workers when xdist is installed)
#   attn  120  benchmarks/bench_routed_attention.py: eager gather + SDPA (baseline), ours
#              (triton), FlexAttention with a page-aligned block mask, SDPA on pre-gathered K/V,
#              dense masked SDPA; forward, backward, forward+backward
#   step  150  python -m benchmarks.wan_step: one training step of the real architecture at the
#              full 16x60x104 latent, 30 layers, bf16, memory measured against the planner
#   tve    60  benchmarks/bench_tve.py, the bf16 Wan block case only (KVPO_BENCH_QUICK=1)
#   copy   30  benchmarks/bench_copy_pages.py: page copies against the device's copy bandwidth
# KVPO_GPU_PARTS="build attn" runs only the parts named (setup always runs).
# A timed-out part gets SIGINT (pytest then still writes its results file), SIGKILL 15 s later.
# After each part, its log is appended to $OUT/run.log, its result file copied to $OUT, and a line
# (ok / failed / timed out / skipped, seconds) added to $OUT/summary.txt, so a later timeout still
# returns the earlier parts. At most 7 files come back: summary.txt, run.log, kernel_tests.xml,
# routed_attention-cuda.json, wan_step-cuda.json, tve_energy-cuda.json, copy_pages-cuda.json.
# Each part's command is single-quoted on purpose: it expands in the part's own shell.
# shellcheck disable=SC2016
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-/tmp/kvpo-gpu-run}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/kvpo-gpu.XXXXXX)
mkdir -p "$work/wan_step"
PY=${PYTHON:-python3}
deadline=${KVPO_GPU_DEADLINE_S:-540}
margin=20
min_part=15
unset TRITON_INTERPRET
export PY PYTHONUNBUFFERED=1 OUT KVPO_GPU_WORK=$work
: > "$OUT/summary.txt"
: > "$OUT/run.log"

part() {  # part NAME BUDGET_S COMMAND: run COMMAND (bash -c) time-boxed; sets part_rc
  local name=$1 budget=$2 cmd=$3 left limit t0 took status size log="$work/$1.log"
  left=$((deadline - SECONDS - margin))
  limit=$((budget < left ? budget : left))
  touch "$work/$name.stamp"
  if [ -n "${KVPO_GPU_PARTS:-}" ] && [ "$name" != setup ] && [[ " $KVPO_GPU_PARTS " != *" $name "* ]]
  then
    part_rc=125
    printf '%-5s %-24s\n' "$name" "not selected" | tee -a "$OUT/summary.txt"
    return
  fi
  if ((limit < min_part)); then
    part_rc=125
    printf '%-5s %-24s %4d s of %3d s\n' "$name" "skipped (deadline)" 0 "$budget" \
      | tee -a "$OUT/summary.txt"
    return
  fi
  echo "== $name (limit $limit s): $cmd"
  t0=$SECONDS
  timeout -s INT -k 15 "$limit" bash -c "$cmd" >"$log" 2>&1
  part_rc=$?
  took=$((SECONDS - t0))
  case $part_rc in
    0) status=ok ;;
    124) status="timed out" ;;
    137) if ((took >= limit)); then status="timed out (killed)"; else status="killed (rc=137)"; fi ;;
    *) status="failed (rc=$part_rc)" ;;
  esac
  tail -n 15 "$log"
  size=$(stat -c %s "$log")
  {
    echo "===== $name: $status, $took s (limit $limit s, budget $budget s)"
    echo "\$ $cmd"
    ((size > 2097152)) && echo "[the first $((size - 2097152)) bytes of this log are cut]"
    tail -c 2097152 "$log"
    echo
  } >>"$OUT/run.log"
  printf '%-5s %-24s %4d s of %3d s\n' "$name" "$status" "$took" "$budget" \
    | tee -a "$OUT/summary.txt"
}

keep() {  # keep NAME FILE: copy FILE to $OUT if part NAME (just run) wrote it
  if [ -f "$2" ] && [ "$2" -nt "$work/$1.stamp" ]; then
    cp "$2" "$OUT/"
  elif ((part_rc != 125)); then
    echo "$1: no $(basename "$2") written" | tee -a "$OUT/summary.txt"
  fi
}

{
  echo "kvpo GPU run, $(date -u +%FT%TZ), deadline $deadline s"
  git rev-parse --short HEAD 2>/dev/null || echo "commit: no .git in this copy"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
} | tee -a "$OUT/summary.txt"

# 1. setup: carried wheels (diffusers for the real architecture), then what the parts run on
part setup 30 '
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit
    ls .whl
  fi
  PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} $PY -c "
import sys, torch, triton
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"triton\", triton.__version__, torch.cuda.get_device_name())
import diffusers; print(\"diffusers\", diffusers.__version__, diffusers.__file__)"
  nvcc --version | tail -n 2'
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# 2. build: the C++/CUDA extension for the local arch only
part build 180 '
  arch=$($PY -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())") || exit
  echo "TORCH_CUDA_ARCH_LIST=$arch"
  KVPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 $PY setup.py build_ext --inplace \
    || exit
  $PY -c "import kvpo_kernels; print(kvpo_kernels.info())"'

# 3. kernel correctness tests on the GPU
part tests 90 '
  opts=()
  $PY -c "import xdist" 2>/dev/null && opts+=(-n 8)
  $PY -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout=60)
  $PY -m pytest -q -p no:cacheprovider "${opts[@]}" tests/kvpo_kernels \
    --junitxml="$OUT/kernel_tests.xml"'

# 4. kernel benchmarks, routed attention first: each provider checked against the eager baseline
part attn 120 'KVPO_BENCH_DEVICE=cuda $PY -m pytest -q -s -p no:cacheprovider \
  benchmarks/bench_routed_attention.py'
keep attn benchmarks/results/routed_attention-cuda.json

# 5. one real-architecture training step at the full latent, memory against the planner
part step 150 '$PY -m benchmarks.wan_step --device cuda --dtype bfloat16 --layers 30 \
  --latent 16x60x104 --frames 39 --switches 15 27 --out "$KVPO_GPU_WORK/wan_step"'
keep step "$work/wan_step/wan_step-cuda.json"

# 6. TVE energies against eager and torch.compile, then page copies against copy bandwidth
part tve 60 'KVPO_BENCH_DEVICE=cuda KVPO_BENCH_QUICK=1 $PY -m pytest -q -s -p no:cacheprovider \
  benchmarks/bench_tve.py'
keep tve benchmarks/results/tve_energy-cuda.json
part copy 30 'KVPO_BENCH_DEVICE=cuda $PY -m pytest -q -s -p no:cacheprovider \
  benchmarks/bench_copy_pages.py'
keep copy benchmarks/results/copy_pages-cuda.json

echo "== summary ($SECONDS s in all; files in $OUT: $(find "$OUT" -type f -printf '%P '))"
cat "$OUT/summary.txt"
