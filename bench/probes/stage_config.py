"""Write one stage of train/configs/embedded.yaml as a stand-alone config (its `stages` emptied), for
the probes that rerun a stage from a given model (stage2_probe.sh, continue_llm_probe.sh).

    python bench/probes/stage_config.py INDEX OUT.json    # INDEX 0: stage 1, 1: stage 2
"""

from __future__ import annotations

import json
import sys

from ferret.training.config import config_to_dict, load_train_config


def main(argv: list[str]) -> None:
    index, out = int(argv[0]), argv[1]
    stages = load_train_config("train/configs/embedded.yaml").stage_configs()
    if index >= len(stages):
        sys.exit(f"stage_config: train/configs/embedded.yaml has {len(stages)} stage(s), no stage {index + 1}")
    with open(out, "w") as f:
        json.dump({**config_to_dict(stages[index]), "stages": []}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
