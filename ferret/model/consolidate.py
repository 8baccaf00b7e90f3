"""Consolidate a Ferret checkpoint: read any layout, check it against its config, write safetensors.

    python -m ferret.model.consolidate --src ferret-7b-bin-shards --dst ferret-7b

Reads sharded `.bin` (the released layout) or safetensors, drops stale buffers, verifies that
the tensor names and shapes are exactly those the config's model has (built on the meta device,
so no memory is spent), and writes sharded safetensors plus the config and tokenizer files.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ferret.model.apply_delta import DTYPES
from ferret.model.checkpoint_io import (
    CheckpointError,
    load_state_dict,
    prepare_output_folder,
    require_folder,
    run_cli,
    save_checkpoint,
)


def expected_shapes(src) -> dict[str, tuple[int, ...]]:
    from ferret.model.builder import read_ferret_config
    from ferret.model.modeling_ferret import FerretLlamaForCausalLM

    config = read_ferret_config(src)
    with torch.device("meta"):
        model = FerretLlamaForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_against_config(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(state) & set(expected) if tuple(state[n].shape) != expected[n])
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            detail.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]}: {list(state[wrong[0]].shape)} vs {list(expected[wrong[0]])})")
        raise CheckpointError("weights do not match config.json: " + "; ".join(detail))


def consolidate(src_path, dst_path, overwrite: bool = False, dtype: torch.dtype | None = None) -> None:
    src = require_folder(src_path, "source")
    dst = prepare_output_folder(dst_path, overwrite, "destination")
    state = load_state_dict(src, "source")
    check_against_config(state, expected_shapes(src))
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    save_checkpoint(state, dst, metadata_from=src)
    if dtype is not None:  # the config names the dtype the weights are stored in
        import json

        config_path = dst / "config.json"
        config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            config[key] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferret.model.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="source checkpoint folder")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder's weights")
    args = parser.parse_args(argv)
    consolidate(args.src, args.dst, overwrite=args.overwrite, dtype=DTYPES.get(args.dtype))
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
