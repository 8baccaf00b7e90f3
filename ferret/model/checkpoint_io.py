"""Checkpoint folders as plain state dicts, shared by the apply_delta / make_delta / consolidate CLIs.

Works on tensors, not models, so a 13B delta needs no model construction: read every shard of a
folder (safetensors or the released `pytorch_model-0000X-of-0000Y.bin` + index), transform, and
write sharded safetensors next to the source folder's config and tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Weight files a folder may hold, in the order we look for them.
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Non-learned buffers some older LLaMA checkpoints carry; never part of a delta.
DROPPED_KEYS = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint folder is unusable for the requested operation (shapes, names, layout)."""


def require_folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} path {str(folder)!r} is not a folder")
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder (all shards when it has an index)."""
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index} is not a valid shard index: {error}") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing[:3])}")
            return files
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    shards = sorted(folder.glob("pytorch_model-*-of-*.bin")) or sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(
        f"no weights in {str(folder)!r} (looked for {', '.join(INDEX_FILES + SINGLE_FILES)} and shards)"
    )


def load_state_dict(folder: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    folder = require_folder(folder, what)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(file))
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt or truncated shard
            raise CheckpointError(f"cannot read weights file {file}: {error}") from None
        state.update(part)
    return {name: tensor for name, tensor in state.items() if not DROPPED_KEYS.search(name)}


@dataclass
class LoadedCheckpoint:
    folder: Path
    state: dict[str, torch.Tensor]


def read_checkpoint(path: str | Path, what: str) -> LoadedCheckpoint:
    folder = require_folder(path, what)
    return LoadedCheckpoint(folder, load_state_dict(folder, what))


def delta_parser(prog: str, description: str, target_help: str, delta_help: str) -> argparse.ArgumentParser:
    """The --base / --target / --delta / --overwrite options shared by apply_delta and make_delta."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--base", "--base-model-path", dest="base", required=True, help="base (Vicuna v1.3) folder")
    parser.add_argument("--target", "--target-model-path", dest="target", required=True, help=target_help)
    parser.add_argument("--delta", "--delta-path", dest="delta", required=True, help=delta_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder's weights")
    return parser


def prepare_output_folder(path: str | Path, overwrite: bool, what: str) -> Path:
    folder = Path(path).expanduser()
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{what} folder {str(folder)!r} already exists (pass --overwrite to replace it)")
        if not folder.is_dir():
            raise FileExistsError(f"{what} path {str(folder)!r} exists and is not a folder")
        for stale in [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *(folder / n for n in INDEX_FILES)]:
            if stale.is_file():
                stale.unlink()
    return folder


def save_checkpoint(
    state: dict[str, torch.Tensor], folder: Path, metadata_from: Path, max_shard_size: str = "5GB"
) -> None:
    """Write `state` as (sharded) safetensors and copy config/tokenizer files from `metadata_from`."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    for item in metadata_from.iterdir():
        is_weights = item.suffix in (".bin", ".safetensors") or item.name in INDEX_FILES
        if item.is_file() and not is_weights:
            shutil.copy2(item, folder / item.name)
    contiguous = {name: tensor.contiguous() for name, tensor in state.items()}
    save_torch_state_dict(contiguous, str(folder), max_shard_size=max_shard_size)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a checkpoint CLI: user errors become one line on stderr and exit status 2."""
    try:
        return main(argv)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
