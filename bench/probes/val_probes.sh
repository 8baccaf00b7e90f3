#!/usr/bin/env bash
# The validation numbers every full run gets in bench/probes/results/ (issue 13): grounding on 60
# val scenes and on the out-of-generator set, naming and yes/no as direct checks on 200 val scenes
# (since session 18: 678 naming questions of each kind and 400 yes/no each; on 60 scenes these move by
# +-0.02 between runs that differ in nothing that matters; earlier runs' *_direct_val.json are 60),
# the yes/no readout and the presence heads, LVIS / POPE / RefCOCO-style grounding on the same 200 val
# scenes (RUN_report_val200.json, since session 19), and the run's per-10-step metrics. Two chains
# side by side, one core each: ~5 min on the 2-core VM. Never the test split.
#   bash bench/probes/val_probes.sh RUN          # reads checkpoints/RUN/hf and checkpoints/RUN/metrics.jsonl
#   bash bench/probes/val_probes.sh RUN WORLD    # val of another world (e.g. data/synth_rot, drawn with
#                                                # --max-rotation 180); results are named RUN_on_<world folder>
#   PRESENCE_LAYER=1 bash bench/probes/val_probes.sh RUN   # the presence head's layer, when
#                                                # train.presence_supervision_layer moved it (default 2)
set -euo pipefail
model=checkpoints/$1/hf
data=${2:-data/synth}
run=$1
[ "$data" = data/synth ] || run=${1}_on_$(basename "$data")
res=bench/probes/results
export HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1 OMP_NUM_THREADS=1
[ -d "$model" ] || { echo "val_probes: $model does not exist (has the run exported?)" >&2; exit 1; }
mkdir -p "$res/yes_no" "runs/val_$run"
[ "$data" != data/synth ] || cp "checkpoints/$1/metrics.jsonl" "$res/${run}_metrics.jsonl"
grounding() {
    python bench/probes/grounding_probe.py --model-path "$model" --data "$data" --scenes 60 --out "$res/${run}_grounding_val.json"
    python bench/probes/grounding_probe.py --model-path "$model" --split ood --data data/ood --scenes 60 \
        --out "$res/${run}_grounding_ood.json"
    python bench/probes/presence_probe.py --model-path "$model" --data "$data" --layer "${PRESENCE_LAYER:-2}" --scenes 20 --out "$res/yes_no/presence_$run.json"
    # LVIS (the two-way choice) and POPE on the same 200 val scenes: LVIS also needs the model to copy
    # one of the two offered names, a skill that moves between runs apart from naming (session 19).
    # It sits in this chain, the shorter one, so that the two chains end together.
    python -m ferret.eval.synthetic_report --data "$data" --split val --max-scenes 200 --model-path "$model" \
        --out "runs/val_$run/report" --no-progress
    cp "runs/val_$run/report/synthetic_report.json" "$res/${run}_report_val200.json"
}
direct() {
    python -m ferret.eval.synthetic_direct --data "$data" --split val --max-scenes 200 --model-path "$model" \
        --out "runs/val_$run"
    cp "runs/val_$run/direct_checks.json" "$res/${run}_direct_val200.json"
    python bench/probes/yes_no_readout.py --model-path "$model" --data "$data" --out "$res/yes_no/readout_$run.json"
}
grounding > "runs/val_$run/grounding.log" 2>&1 & g=$!
direct > "runs/val_$run/direct.log" 2>&1 & d=$!
status=0
wait "$g" || { status=1; tail -5 "runs/val_$run/grounding.log" >&2; }
wait "$d" || { status=1; tail -5 "runs/val_$run/direct.log" >&2; }
exit "$status"
