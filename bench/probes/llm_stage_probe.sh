#!/usr/bin/env bash
# LLM-stage probe (issue 13): how fast does the LLM stage bind on top of a given vision warm-up?
# A full run spends 1/4 of its time on the warm-up; to try several LLM-stage changes on one warm-up,
# export the warm-up once, then run the LLM stage from it, stopped after STEPS steps of its own
# full schedule (so steps compare one for one with a full run's metrics.jsonl), and compare
# curves with binding_curve.py. Never the test split.
#
#   bash bench/probes/llm_stage_probe.sh warmup NAME CONFIG [section.key=value ...]
#       the warm-up alone: CONFIG's run with one LLM step at learning rate 0 (the schedule's linear
#       warm-up starts at 0), so checkpoints/NAME/hf holds the warmed-up vision side and the LLM
#       as initialised, weight for weight
#   bash bench/probes/llm_stage_probe.sh llm NAME WARMUP_HF STEPS CONFIG [section.key=value ...]
#       CONFIG's LLM stage from WARMUP_HF (no warm-up), killed after STEPS logged steps; a step
#       checkpoint at STEPS (export_step.py makes it a model folder); checkpoints/NAME/metrics.jsonl
#
# The warm-up part prints the full run's warm-up losses exactly. With the same CONFIG and
# overrides, the llm part's first logged losses agree with the full run's LLM stage to ~1e-5
# (relative), not bit for bit (session 22: step 10 loss 5.840241 against 5.840176), so a
# change's curve is read against the full run's as against another seed's.
set -euo pipefail
mode=$1; name=$2; shift 2
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
port=${PORT:-29541}
out=checkpoints/$name
case "$mode" in
  warmup)
    config=$1; shift
    torchrun --nproc_per_node=2 --master_port="$port" train/ferret_train.py --config "$config" "$@" \
        train.max_steps=1 train.save_steps=0 train.tensorboard=false train.output_dir="$out"
    ;;
  llm)
    warm=$1; steps=$2; config=$3; shift 3
    [ -f "$warm/config.json" ] || { echo "llm_stage_probe: $warm is not a model folder" >&2; exit 1; }
    rm -f "$out/metrics.jsonl"
    setsid torchrun --nproc_per_node=2 --master_port="$port" train/ferret_train.py --config "$config" "$@" \
        model.pretrained="$warm" model.tiny=false train.vision_warmup_steps=0 train.save_steps="$steps" \
        train.save_total_limit=1 train.tensorboard=false train.output_dir="$out" &
    job=$!
    # Stop once step STEPS is logged and its checkpoint is written (the trainer writes `latest` last).
    while kill -0 "$job" 2>/dev/null; do
        if [ -f "$out/checkpoints/latest" ] && grep -q "$(printf 'step-%08d' "$steps")" "$out/checkpoints/latest"; then
            kill -- -"$job"; wait "$job" || true
            echo "llm_stage_probe: stopped $name after step $steps"
            exit 0
        fi
        sleep 5
    done
    wait "$job"   # ended by itself: the schedule was shorter than STEPS, or it failed
    ;;
  *) echo "usage: llm_stage_probe.sh warmup NAME CONFIG [k=v ...] | llm NAME WARMUP_HF STEPS CONFIG [k=v ...]" >&2; exit 2 ;;
esac
