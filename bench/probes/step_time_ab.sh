#!/usr/bin/env bash
# Why are the LLM stage's steps slower in the shipped recipe than they were on the default world?
# (session 27; issue 13's 60-minute budget). Runs the recipe's LLM stage from one exported warm-up
# for STEPS steps, once per variant, one after the other on an otherwise idle machine, and prints
# each variant's mean samples/s over its logged steps after the 20th (the first ones include start-up).
#
#   bash bench/probes/step_time_ab.sh WARMUP_HF [STEPS]
#       variants: the recipe (turned world, copy supervision on) / the default world / batches
#       grouped by length and padded to a multiple of 8 (data.group_by_length, session 27)
set -euo pipefail
warm=$1; steps=${2:-60}
config=train/configs/embedded.yaml
run() {
    local name=$1; shift
    bash bench/probes/llm_stage_probe.sh llm "$name" "$warm" "$steps" "$config" "$@" > "logs/$name.log" 2>&1
    python3 - "$name" "checkpoints/$name/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
rates = [r["samples_per_s"] for r in rows if r["step"] > 20]
print(f"{sys.argv[1]:32s} steps {rows[-1]['step']:4d}  samples/s {sum(rates) / len(rates):6.2f}  "
      f"({', '.join(f'{x:.2f}' for x in rates)})")
PY
}
run st_rot45_copy
run st_default_copy data.data_path=data/synth/train.json data.scene_records=data/synth/scenes_train.json
run st_rot45_grouped data.group_by_length=true data.pad_to_multiple_of=8
