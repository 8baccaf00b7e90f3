#!/usr/bin/env bash
# Does a finished run of train/configs/embedded.yaml reproduce the shipped model? (issue 13, requirement 4)
#   bash bench/probes/repro_shipped.sh [RUN]      # default RUN: checkpoints/embedded (the config's own output_dir)
# Compares every stage's logged numbers (timing aside) with ferret/assets/model/train_metrics*.jsonl
# (stage 1: train_metrics.jsonl; a later stage: train_metrics_<its name>.jsonl), and the run's final
# export (the config's last stage), consolidated to fp16 as the card's Training does, with
# ferret/assets/model/model.safetensors tensor for tensor. Writes
# bench/probes/results/repro_<run name>_final.json.
set -euo pipefail
run=${1:-checkpoints/embedded}
export HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
last=$(python -c "
from ferret.training.config import load_train_config
stages = load_train_config('train/configs/embedded.yaml').stages
print(stages[-1].name if stages else '.')")
python -m ferret.model.consolidate --src "$run/$last/hf" --dst "$tmp/model" --dtype float16 --overwrite > /dev/null
python - "$run" "$tmp/model" <<'PY'
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, "bench/probes")
from repro_check import compare, read_metrics

from ferret.training.config import load_train_config

run, consolidated = Path(sys.argv[1]), Path(sys.argv[2])
shipped = Path("ferret/assets/model")
stage1 = compare(read_metrics(shipped / "train_metrics.jsonl"), read_metrics(run / "metrics.jsonl"), 10**9)
later = {}
for stage in load_train_config("train/configs/embedded.yaml").stages:
    # an averaged stage's trained model is <name>/<name>-0 (its export is the average)
    trained = run / stage.name / f"{stage.name}-0"
    later[stage.name] = compare(read_metrics(shipped / f"train_metrics_{stage.name}.jsonl"),
                                read_metrics((trained if trained.is_dir() else run / stage.name) / "metrics.jsonl"), 10**9)
a, b = load_file(shipped / "model.safetensors"), load_file(consolidated / "model.safetensors")


def differences(steps: list[dict]) -> dict:
    """Per logged key that differs anywhere: in how many steps, and by how much at most (None when
    the relaunch did not log it)."""
    out = {}
    for s in steps:
        for key, (ref, new) in s["differ"].items():
            entry = out.setdefault(key, {"steps": 0, "max_abs": 0.0})
            entry["steps"] += 1
            entry["max_abs"] = None if new is None or entry["max_abs"] is None else max(entry["max_abs"], abs(ref - new))
    return out


result = {
    "run": str(run),
    "stage1_logged_steps": len(stage1), "stage1_all_equal": bool(stage1) and all(s["equal"] for s in stage1),
    "stage1_losses_equal": bool(stage1) and all(s["loss"][0] == s["loss"][1] for s in stage1),
    "stage1_differences": differences(stage1),
    "stage1_new_keys": sorted({k for s in stage1 for k in s.get("new_keys", [])}),
    "later_stages": {name: {"logged_steps": len(rows), "all_equal": bool(rows) and all(s["equal"] for s in rows),
                            "losses_equal": bool(rows) and all(s["loss"][0] == s["loss"][1] for s in rows),
                            "differences": differences(rows),
                            "new_keys": sorted({k for s in rows for k in s.get("new_keys", [])})}
                     for name, rows in later.items()},
    "fp16_weights_equal_to_shipped": set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a),
    "tensors": len(a),
}
print(json.dumps(result, indent=1))
Path(f"bench/probes/results/repro_{run.name}_final.json").write_text(json.dumps(result, indent=1) + "\n")
PY
