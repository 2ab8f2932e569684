#!/usr/bin/env bash
# The whole GPU side in one command (for a lent GPU machine: torch with CUDA, Triton, nvcc):
# build the extension with its CUDA kernels, run the kernel tests on the GPU, run every kernel
# benchmark suite, render benchmarks/RESULTS.md, and copy results to $OUT when it is set.
#   bash benchmarks/run_gpu.sh            # from the repository root
# The kernel layer (kvpo_kernels) needs no diffusers/peft, so this works on a bare CUDA machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$out"
log="$out/gpu_run.log"
exec > >(tee "$log") 2>&1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python -m pip install -q pytest hypothesis ninja 2>/dev/null || true

echo "== build (CUDA kernels for the local GPU arch) =="
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
KVPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 python setup.py build_ext --inplace \
  || { echo "BUILD FAILED"; exit 1; }
python -c "import kvpo_kernels; print(kvpo_kernels.info())"

echo "== kernel tests on the GPU =="
python -m pytest -q -x tests/kvpo_kernels --junitxml="$out/gpu_tests.xml"
tests_rc=$?

echo "== kernel benchmarks =="
python -m pytest -q -s benchmarks --ignore=benchmarks/bench_group_rollout.py --ignore=benchmarks/bench_train_step.py --ignore=benchmarks/bench_rewards.py  # these need diffusers / transformers
bench_rc=$?
python -m benchmarks.report
cp benchmarks/results/*-cuda.json benchmarks/RESULTS.md "$out"/ 2>/dev/null || true
echo "tests rc=$tests_rc benchmarks rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
