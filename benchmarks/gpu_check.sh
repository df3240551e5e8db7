#!/usr/bin/env bash
# The GPU check of issue 13, for a machine with one NVIDIA GPU and no network (the lent H200: python3 3.12,
# torch 2.11 + CUDA 13, nvcc, ninja, pytest, hypothesis). Builds the CUDA extension against the torch found
# there, runs the kernel, reducer and hook tests on CUDA tensors, and times selection, pack and unpack-add
# against torch.topk and one device-memory read. Everything goes under the folder given (default $OUT):
#   bash benchmarks/gpu_check.sh "$OUT"      # about 5-8 minutes; gpu_check.json, build.log, tests.log
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$py" -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$out/machine.txt" 2>&1
# build: setup.py makes a CUDAExtension when torch has CUDA and nvcc is found
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  timeout 300 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1
echo "build exit $?" | tee -a "$out/build.log"
# tests on CUDA tensors: the kernel tests are parametrized by device (cpu and cuda); the reducer on CUDA is
# checked against the CPU result by gpu_timings below
timeout 240 "$py" -m pytest -q -x -p no:cacheprovider \
  tests/unit/test_kernels.py tests/unit/test_selection.py tests/unit/test_payload.py > "$out/tests.log" 2>&1
echo "tests exit $?" | tee -a "$out/tests.log"
timeout 180 "$py" -m benchmarks.gpu_timings --json "$out/gpu_check.json" 2>&1 | tee "$out/timings.log"
