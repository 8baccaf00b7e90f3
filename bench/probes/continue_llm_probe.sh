#!/usr/bin/env bash
# What more LLM-stage steps buy (issue 13, session 38): stage 1's export trained on for STEPS more
# steps of the config's LLM stage (a fresh cosine from LR, another data order: train.seed 7; the copy
# supervision off, as after its 700 steps), then the config's stage 2 from that (stage2_probe.sh) and
# the shipped kind of model from it (wise_probe.sh, averaged with the continued stage 1). It tests
# steps beyond the 60-minute budget, so it informs and cannot ship. Never the test split.
#   bash bench/probes/continue_llm_probe.sh BASE NAME STEPS LR
#       e.g. bash bench/probes/continue_llm_probe.sh checkpoints/repro_s35/hf more900 900 5e-4
#   -> checkpoints/NAME/hf (stage 1 continued), checkpoints/NAME_s2/hf, checkpoints/NAME_s2_wise/hf
set -euo pipefail
base=$1; name=$2; steps=$3; lr=$4
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
[ -f "$base/config.json" ] || { echo "continue_llm_probe: $base is not a model folder" >&2; exit 1; }
out=checkpoints/$name
mkdir -p "$out"
python bench/probes/stage_config.py base "$out/stage1_config.json"
torchrun --nproc_per_node=2 --master_port="${PORT:-29561}" train/ferret_train.py --config "$out/stage1_config.json" \
    model.pretrained="$base" model.tiny=false train.vision_warmup_steps=0 train.output_dir="$out" \
    train.tensorboard=false train.seed=7 train.max_steps="$steps" train.learning_rate="$lr" \
    train.name_supervision_copy=false train.name_supervision_copy_steps=null
bash bench/probes/stage2_probe.sh "$out/hf" "${name}_s2"
bash bench/probes/wise_probe.sh "${name}_s2" "$out/hf"
