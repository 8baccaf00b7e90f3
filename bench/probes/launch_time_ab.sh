#!/usr/bin/env bash
# What does a recipe change cost in wall time, on this machine today? (issue 13's 60-minute budget;
# session 42). The machine's speed varies by 2x from day to day (bench/results/README.md), so a
# launch's minutes compare only with a launch of the reference recipe on the same machine: this
# runs each CONFIG's first stage, one after the other on an otherwise idle machine, for WARMUP
# vision warm-up steps and STEPS LLM steps (its `stages` dropped, no export; the trainer's final
# checkpoint, written after the last timed step, is deleted), and prints the warm-up's seconds per
# step and the LLM stage's mean samples/s over its logged steps after the 10th (the first ones
# include start-up). Scale a full launch's phases by the ratios.
#
#   bash bench/probes/launch_time_ab.sh WARMUP STEPS CONFIG [CONFIG ...]
#   e.g. bash bench/probes/launch_time_ab.sh 100 40 train/configs/embedded.yaml bench/probes/configs/embedded_b2.yaml
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: bash bench/probes/launch_time_ab.sh WARMUP STEPS CONFIG [CONFIG ...]" >&2; exit 2; }
warmup=$1; steps=$2; shift 2
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
mkdir -p logs
for config in "$@"; do
    name=time_ab_$(basename "$config" .yaml)
    one_stage=$(mktemp --suffix=.yaml)
    trap 'rm -f "$one_stage"' EXIT
    python3 -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); c.pop("stages", None); yaml.safe_dump(c, open(sys.argv[2], "w"))' \
        "$config" "$one_stage"
    rm -rf "checkpoints/$name"
    torchrun --nproc_per_node=2 --master_port="${PORT:-29543}" train/ferret_train.py --config "$one_stage" \
        train.vision_warmup_steps="$warmup" train.max_steps="$steps" train.save_steps=0 train.export_hf=false \
        train.tensorboard=false train.output_dir="checkpoints/$name" > "logs/$name.log" 2>&1
    rm -f "$one_stage"
    python3 - "$config" "logs/$name.log" "checkpoints/$name/metrics.jsonl" <<'PY'
import json, re, sys
config, log, metrics = sys.argv[1:]
done = re.search(r"vision warm-up done: (\d+) steps, .* \((\d+) s\)", open(log).read())
rows = [json.loads(line) for line in open(metrics) if line.strip()]
rates = [r["samples_per_s"] for r in rows if r["step"] > 10]
print(f"{config:48s} warm-up {int(done[2]) / int(done[1]):.3f} s/step  LLM {sum(rates) / len(rates):6.2f} samples/s "
      f"({', '.join(f'{x:.2f}' for x in rates)})")
PY
    rm -rf "checkpoints/$name/checkpoints"
done
