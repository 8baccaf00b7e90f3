"""Write one stage of train/configs/embedded.yaml as a stand-alone config (its `stages` emptied), for
the probes that rerun a stage from a given model (stage2_probe.sh, continue_llm_probe.sh).

    python bench/probes/stage_config.py NAME OUT.json
        NAME: `base` (the config's own run, the LLM stage) or a stage's name (more_steps, small_objects;
        a stage with soup variants or start_weight gives its first trained variant)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ferret.training.config import config_to_dict, load_train_config


def main(argv: list[str]) -> None:
    name, out = argv[0], argv[1]
    config = load_train_config("train/configs/embedded.yaml")
    stages = config.stage_configs()
    names = ["base"] + [s.name for s in config.stages]
    if name not in names:
        sys.exit(f"stage_config: train/configs/embedded.yaml has no stage {name!r} (it has {', '.join(names)})")
    # Stage k's runs write under <output_dir>/<its name>; the base run writes to output_dir itself.
    root = Path(config.train.output_dir)
    chosen = stages[0] if name == "base" else next(
        s for s in stages[1:] if Path(s.train.output_dir).relative_to(root).parts[0] == name)
    with open(out, "w") as f:
        json.dump({**config_to_dict(chosen), "stages": []}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
