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
from pathlib import Path

import torch


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-dir", required=True, type=Path)
    parser.add_argument("--like", required=True, type=Path, help="a finished run's hf/ folder, same architecture")
    parser.add_argument("--dst", required=True, type=Path)
    args = parser.parse_args(argv)
    from ferret.model.checkpoint_io import save_checkpoint
    from ferret.model.consolidate import check_against_config, expected_shapes

    states = args.step_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise SystemExit(f"{states}: no DeepSpeed model states (is --step-dir a step-NNNNNNNN folder?)")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    # DeepSpeed's tensors are views into flat buffers: cloned, each owns its storage.
    state = {name: tensor.clone() for name, tensor in module.items()}
    check_against_config(state, expected_shapes(args.like))
    save_checkpoint(state, args.dst, metadata_from=args.like)  # weights, plus --like's config and tokenizer files
    print(f"wrote {args.dst} ({len(state)} tensors from {states})")
    return args.dst


if __name__ == "__main__":
    main()
