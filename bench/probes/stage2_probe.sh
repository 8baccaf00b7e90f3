#!/usr/bin/env bash
# Second-stage probe (issue 13): the shipped recipe's stage 2 (train/configs/embedded.yaml's first
# `stages` entry: 240 steps at 3e-4 on the small-object world) as a fine-tune of any model folder,
# with one change given as overrides. From a finished model (the shipped one included) it is a third
# stage, so read it against the same stage without the change (the control), not against the base.
# ~8 min on the 2-core VM alone. Never the test split.
#
#   bash bench/probes/stage2_probe.sh BASE_MODEL NAME [section.key=value ...]
#       e.g. bash bench/probes/stage2_probe.sh ferret/assets/model s3_colneg \
#                data.data_path=data/synth_small_colneg/train.json \
#                data.scene_records=data/synth_small_colneg/scenes_train.json
#   -> checkpoints/NAME/hf (the model), checkpoints/NAME/metrics.jsonl, checkpoints/NAME/stage2_config.json
# Since session 35 the config's stage 2 ships the midpoint of its start and the trained model
# (`start_weight: 1`); this probe writes the trained model only. The shipped kind of model from it:
#   python bench/probes/weight_soup.py --out checkpoints/NAME_wise/hf BASE_MODEL checkpoints/NAME/hf
set -euo pipefail
base=$1; name=$2; shift 2
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
[ -f "$base/config.json" ] || { echo "stage2_probe: $base is not a model folder" >&2; exit 1; }
out=checkpoints/$name
mkdir -p "$out"
python bench/probes/stage_config.py small_objects "$out/stage2_config.json"
torchrun --nproc_per_node=2 --master_port="${PORT:-29551}" train/ferret_train.py --config "$out/stage2_config.json" \
    model.pretrained="$base" train.output_dir="$out" train.tensorboard=false "$@"
