#!/usr/bin/env bash
# One command for a CUDA machine: the Triton kernel tests natively on the GPU (plus the CUDA-only
# no-sync / CUDA-graph tests and the fast-path tests), then the GPU benchmark of the full cases.
# Results (test log, bench table, JSON, nvidia-smi) go to $OUT if set, else bench/results/.
#   PYTHON=/path/to/python bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results}"
PY="${PYTHON:-python}"
mkdir -p "$RESULTS"
unset TRITON_INTERPRET  # native kernels, never the interpreter
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi > "$RESULTS/nvidia_smi.txt" 2>&1 || true
"$PY" - <<'PY' || { echo "no usable CUDA torch here"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())
PY

timeout 420 "$PY" -m pytest -p no:cacheprovider --import-mode=importlib -q -rs \
    kernels/tests/test_triton_kernels.py kernels/tests/test_triton_cuda.py kernels/tests/test_fast_sampler.py \
    2>&1 | tee "$RESULTS/gpu_tests.txt"
tests=${PIPESTATUS[0]}

timeout 420 "$PY" bench/sampler_bench.py --device cuda --out "$RESULTS/sampler_cuda.json" 2>&1 | tee "$RESULTS/gpu_bench.txt"
bench=${PIPESTATUS[0]}

echo "tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
