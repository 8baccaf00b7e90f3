#!/usr/bin/env bash
# A stage-2 probe's model as it would ship (issue 13, since session 35): the midpoint of its start and
# the trained stage (weight_soup.py), then val_probes.sh and the out-of-generator naming checks
# (synthetic_direct on data/ood, naming_errors.py). ~5 min on the 2-core VM alone. Never the test split.
#   bash bench/probes/wise_probe.sh TRAINED [BASE]   # checkpoints/TRAINED/hf from stage2_probe.sh;
#                                                    # BASE defaults to checkpoints/repro_s35/hf (stage 1's export)
#   -> checkpoints/TRAINED_wise/hf and bench/probes/results/TRAINED_wise_*
set -euo pipefail
trained=$1; base=${2:-checkpoints/repro_s35/hf}; name=${trained}_wise
export HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1 OMP_NUM_THREADS=1
res=bench/probes/results
python bench/probes/weight_soup.py --out "checkpoints/$name/hf" "$base" "checkpoints/$trained/hf"
cp "checkpoints/$trained/metrics.jsonl" "checkpoints/$name/metrics.jsonl"
PRESENCE_LAYER=1 bash bench/probes/val_probes.sh "$name"
python -m ferret.eval.synthetic_direct --data data/ood --split ood --max-scenes 60 --model-path "checkpoints/$name/hf" \
    --out "runs/ood_$name"
cp "runs/ood_$name/direct_checks.json" "$res/${name}_direct_ood.json"
python bench/probes/naming_errors.py --checks "$res/${name}_direct_ood.json" --scenes data/ood/scenes_ood.json \
    --out "$res/naming_errors/${name}_ood.json" > /dev/null
