#!/usr/bin/env bash
# Curriculum probe (issue 13, requirement 3): does a first LLM stage on one-object scenes, where
# every name has one answer and binding is trivial, make grounding appear sooner? One arm of the
# comparison; run it once with the one-object world and once with the main world (the control),
# from the same warmed-up model, so the arms differ only in stage 1's scenes.
#   bash bench/probes/curriculum_probe.sh NAME BASE_HF WORLD1 [section.key=value ...]
#     BASE_HF  a run's hf/ folder after the vision warm-up (train.max_steps=1), e.g. checkpoints/curr_base/hf
#     WORLD1   data/synth1 (python -m ferret.data.synthetic --out data/synth1 --n 20000 --seed 1
#              --workers 1 --turns-per-sample 5 --min-objects 1 --max-objects 1) or data/synth
#   env: STEPS1 (100) and STEPS2 (200) LLM steps, PORT (29533)
# Stage 1: STEPS1 steps on WORLD1. Stage 2: STEPS2 steps on data/synth, a checkpoint every 100.
# Both stages use a constant learning rate, so the restart between them is the same in both arms.
# Writes checkpoints/curr_NAME_{1,2}/ and runs/probes/curr_NAME_step{N}.json (val grounding at
# total LLM step N: the end of stage 1 and every stage-2 checkpoint).
set -euo pipefail
name=$1; base=$2; world1=$3; shift 3
steps1=${STEPS1:-100}; steps2=${STEPS2:-200}; port=${PORT:-29533}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
mkdir -p runs/probes
common=(--config bench/probes/configs/coord_pe.yaml model.tiny=false
        train.vision_warmup_steps=0 train.warmup_steps=10 train.lr_scheduler=constant train.tensorboard=false)
stage() {  # stage OUT WORLD STEPS FROM [overrides]
    local out=$1 world=$2 steps=$3 from=$4; shift 4
    torchrun --nproc_per_node=2 --master_port="$port" train/ferret_train.py "${common[@]}" \
        model.pretrained="$from" data.data_path="$world/train.json" data.scene_records="$world/scenes_train.json" \
        train.max_steps="$steps" train.save_steps=100 train.save_total_limit=10 train.output_dir="$out" "$@"
}
score() {  # score MODEL_DIR TOTAL_STEP
    python bench/probes/grounding_probe.py --model-path "$1" --data data/synth --scenes 60 \
        --out "runs/probes/curr_${name}_step$2.json"
}
stage "checkpoints/curr_${name}_1" "$world1" "$steps1" "$base" "$@"
score "checkpoints/curr_${name}_1/hf" "$steps1"
stage "checkpoints/curr_${name}_2" data/synth "$steps2" "checkpoints/curr_${name}_1/hf" "$@"
for dir in "checkpoints/curr_${name}_2"/checkpoints/step-*; do
    step=$((10#${dir##*step-}))
    [ "$step" -lt "$steps2" ] || continue  # the last one is scored from hf/ below
    python bench/probes/export_step.py --step-dir "$dir" --like "checkpoints/curr_${name}_2/hf" \
        --dst "/tmp/curr_${name}_$step"
    score "/tmp/curr_${name}_$step" $((steps1 + step))
    rm -rf "/tmp/curr_${name}_$step"
done
score "checkpoints/curr_${name}_2/hf" $((steps1 + steps2))
