#!/usr/bin/env bash
# The model card's numbers for one model folder: the whole held-out test split (800 scenes) and
# the out-of-generator set (data/ood), in the benchmark formats (synthetic_report) and as direct
# checks (synthetic_direct: naming per region kind, yes/no). The two scripts run side by side, one
# core each: ~13-15 min on the 2-core VM (~30 min one after the other).
#   bash bench/probes/evaluate_model.sh MODEL_DIR OUT_DIR [WORLD]    # WORLD: data/synth unless given
set -euo pipefail
model=$1; out=$2; data=${3:-data/synth}
export HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1 OMP_NUM_THREADS=1
mkdir -p "$out/test" "$out/ood"
report() {
    python -m ferret.eval.synthetic_report --data "$data" --split test --max-scenes 0 --model-path "$model" --out "$out/test" --no-progress
    python -m ferret.eval.synthetic_report --data data/ood --split ood --max-scenes 0 --model-path "$model" --out "$out/ood" --no-progress
}
direct() {
    python -m ferret.eval.synthetic_direct --data "$data" --split test --max-scenes 0 --model-path "$model" --out "$out/test"
    python -m ferret.eval.synthetic_direct --data data/ood --split ood --max-scenes 0 --model-path "$model" --out "$out/ood"
}
report > "$out/report.log" 2>&1 & report_pid=$!
direct > "$out/direct.log" 2>&1 & direct_pid=$!
status=0
wait "$report_pid" || { status=1; echo "synthetic_report failed: $out/report.log" >&2; tail -5 "$out/report.log" >&2; }
wait "$direct_pid" || { status=1; echo "synthetic_direct failed: $out/direct.log" >&2; tail -5 "$out/direct.log" >&2; }
exit "$status"
