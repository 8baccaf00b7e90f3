"""Export a mid-run DeepSpeed checkpoint as a loadable model folder, to probe a run while it trains.

    python bench/probes/export_step.py --step-dir checkpoints/full_coordpe_p3/checkpoints/step-00000300 \
        --like checkpoints/full_coordpe_v2/hf --dst /tmp/p3_step300

A run writes its Hugging Face folder (`hf/`) only at the end; its step checkpoints hold the
weights in DeepSpeed's `mp_rank_00_model_states.pt` (ZeRO-2 keeps whole parameters there). The
model config, tokenizer and processor files come from `--like`, a finished run of the same
architecture; the weights must match that config's model name for name and shape, or this stops.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

COPIED = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
          "tokenizer.json", "tokenizer_config.json")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-dir", required=True, type=Path)
    parser.add_argument("--like", required=True, type=Path, help="a finished run's hf/ folder, same architecture")
    parser.add_argument("--dst", required=True, type=Path)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    from ferret.model.consolidate import check_against_config, expected_shapes

    states = args.step_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise SystemExit(f"{states}: no DeepSpeed model states (is --step-dir a step-NNNNNNNN folder?)")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    state = {name: tensor.contiguous() for name, tensor in module.items()}
    check_against_config(state, expected_shapes(args.like))
    args.dst.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (args.like / name).is_file():
            shutil.copy(args.like / name, args.dst / name)
    save_file(state, str(args.dst / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.dst} ({len(state)} tensors from {states})")
    return args.dst


if __name__ == "__main__":
    main()
