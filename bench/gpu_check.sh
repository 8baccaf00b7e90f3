#!/usr/bin/env bash
# The one GPU command (fits in 8 minutes on an H100/H200):
#  1. the Triton kernel tests natively on the GPU: kernels vs the reference at the GPU tilings in
#     fp32 and bf16, forward and backward, the first-contact checks, the CUDA-only no-sync and
#     CUDA-graph tests (test_triton_kernels / test_triton_tilings / test_triton_cuda);
#  2. the GPU benchmark at the released shapes (bf16; 1x1, 16x2, 64x4 images x regions), each case
#     checked against the fast path (assert_close at those shapes) before it is timed.
# Writes gpu_check.json (the card, versions, exit codes, test summary) and sampler_cuda.json to
# $OUT if set and to bench/results/; logs and nvidia-smi output go to $OUT (else bench/results/).
#   PYTHON=/path/to/python bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results
DEST="${OUT:-$RESULTS}"
PY="${PYTHON:-python}"
mkdir -p "$RESULTS" "$DEST"
unset TRITON_INTERPRET  # native kernels, never the interpreter
# Triton 3.9's default (fusion on), stated to silence its warning; FPS and kNN turn it off themselves.
export HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

nvidia-smi > "$DEST/nvidia_smi.txt" 2>&1 || true
"$PY" - <<'PY' || { echo "no usable CUDA torch here"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())
PY

timeout 210 "$PY" -m pytest -p no:cacheprovider --import-mode=importlib -q -rs \
    kernels/tests/test_triton_kernels.py kernels/tests/test_triton_tilings.py kernels/tests/test_triton_cuda.py \
    2>&1 | tee "$DEST/gpu_tests.txt"
tests=${PIPESTATUS[0]}

timeout 240 "$PY" bench/sampler_bench.py --device cuda --repeats 10 --out "$DEST/sampler_cuda.json" 2>&1 | tee "$DEST/gpu_bench.txt"
bench=${PIPESTATUS[0]}

"$PY" - "$DEST" "$tests" "$bench" "$start" <<'PY'
import json, pathlib, sys, time
import torch, triton
dest, tests, bench, start = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = (dest / "gpu_tests.txt").read_text().strip().splitlines() if (dest / "gpu_tests.txt").exists() else []
report = {
    "card": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
    "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
    "tests_exit": tests, "tests_summary": log[-1] if log else "", "bench_exit": bench,
    "bench_json": "sampler_cuda.json", "seconds": round(time.time() - start),
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
}
(dest / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps(report))
PY
if [ "$DEST" != "$RESULTS" ]; then
    cp "$DEST/gpu_check.json" "$RESULTS/" 2>/dev/null
    cp "$DEST/sampler_cuda.json" "$RESULTS/" 2>/dev/null
fi
echo "tests exit $tests, bench exit $bench, $(( $(date +%s) - start )) s"
exit $(( tests != 0 || bench != 0 ))
