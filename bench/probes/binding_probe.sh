#!/usr/bin/env bash
# Binding probe (issue 13, requirement 3): the LLM stage alone for a few minutes, starting from a
# tower trained by bench/probes/tower_probe.py --save, then the grounding probe on val scenes.
#   bash bench/probes/binding_probe.sh NAME TOWER.pt STEPS [section.key=value ...]
# Writes checkpoints/probe_NAME/ (metrics.jsonl) and runs/probes/binding_NAME.json.
set -euo pipefail
name=$1; tower=$2; steps=$3; shift 3
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
out=checkpoints/probe_$name
torchrun --nproc_per_node=2 --master_port=29533 train/ferret_train.py --config train/configs/embedded.yaml \
    model.vision_tower_weights="$tower" train.vision_warmup_steps=0 train.max_steps="$steps" train.save_steps=0 \
    train.output_dir="$out" train.tensorboard=false "$@"
python bench/probes/grounding_probe.py --model-path "$out/hf" --data data/synth --scenes 60 \
    --out "runs/probes/binding_$name.json"
