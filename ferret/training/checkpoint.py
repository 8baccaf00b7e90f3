"""Training checkpoints that survive crashes, and the export to a Hugging Face folder.

Layout under a run's checkpoint root:

    checkpoints/
      step-00000010/      one complete checkpoint (DeepSpeed files, trainer_state.json, rng_state_rank*.pt)
      step-00000020/
      latest              text file naming the newest complete checkpoint ("step-00000020")
      .staging/           where a checkpoint is written before it is published

A checkpoint is written into `.staging/<tag>/`, every file is fsynced, the folder is renamed
to `<tag>` (an atomic rename on POSIX) and only then is `latest` replaced (write a temp file,
fsync, rename). A crash at any point leaves `latest` naming a complete checkpoint (or absent).
The checkpoint root must be on a file system that every rank sees (as DeepSpeed assumes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TrainingCheckpointError",
    "TrainerState",
    "checkpoint_tag",
    "atomic_write_text",
    "fsync_tree",
    "staging_root",
    "publish_checkpoint",
    "read_latest",
    "list_checkpoints",
    "prune_checkpoints",
    "capture_rng_state",
    "restore_rng_state",
    "save_rng_state",
    "load_rng_state",
    "save_deepspeed_checkpoint",
    "load_deepspeed_checkpoint",
    "merge_lora_state_dict",
    "consolidated_state_dict",
    "export_hf_folder",
]

LATEST = "latest"
STAGING = ".staging"
TRAINER_STATE = "trainer_state.json"
_TAG_RE = re.compile(r"^step-(\d{8,})$")


class TrainingCheckpointError(FileNotFoundError):
    """A training checkpoint (the resumable DeepSpeed kind, not a model's weight files: see
    ferret.model.checkpoint_io.CheckpointError) is missing, incomplete, or does not fit the run."""


@dataclass
class TrainerState:
    """Where training stands after `global_step` optimizer steps (enough to continue exactly)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    samples_seen: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    micro_batch_size: int = 1
    accumulation_steps: int = 1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def checkpoint_tag(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------------- atomic file ops


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under `path` (files first, then their folders)."""
    path = Path(path)
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def staging_root(root: str | Path) -> Path:
    return Path(root) / STAGING


def publish_checkpoint(root: str | Path, tag: str) -> Path:
    """Make the staged checkpoint `.staging/<tag>` durable, move it to `<tag>`, then point `latest` at it."""
    root = Path(root)
    staged = staging_root(root) / tag
    if not staged.is_dir():
        raise TrainingCheckpointError(f"no staged checkpoint to publish at {staged}")
    fsync_tree(staged)
    final = root / tag
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        trash = staging_root(root) / f"{tag}.old-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(staged, final)
    _fsync_path(root)
    atomic_write_text(root / LATEST, tag + "\n")
    return final


def read_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None when the run has none yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not _TAG_RE.match(tag):
        raise TrainingCheckpointError(f"{pointer} holds {tag!r}, not a checkpoint tag like 'step-00000010'")
    folder = root / tag
    if not (folder / TRAINER_STATE).is_file():
        raise TrainingCheckpointError(f"{pointer} names {tag} but {folder / TRAINER_STATE} is missing")
    return folder


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names); returns the deleted."""
    if keep <= 0:
        return []
    protected = read_latest(root)
    folders = list_checkpoints(root)
    doomed = [p for p in folders[:-keep] if protected is None or p.resolve() != protected.resolve()]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(folder: str | Path, rank: int) -> None:
    torch.save(capture_rng_state(), Path(folder) / f"rng_state_rank{rank}.pt")


def load_rng_state(folder: str | Path, rank: int) -> None:
    path = Path(folder) / f"rng_state_rank{rank}.pt"
    if not path.is_file():
        raise TrainingCheckpointError(f"{path} is missing: was the checkpoint written by a run with fewer ranks?")
    # The state holds numpy arrays and python tuples, so the safe loader cannot read it; the file
    # was written by this same training run.
    restore_rng_state(torch.load(path, weights_only=False))


# --------------------------------------------------------------------------- DeepSpeed save / load


def save_deepspeed_checkpoint(engine, root: str | Path, state: TrainerState, rank: int,
                              on_staged: Callable[[int], None] | None = None) -> Path | None:
    """Collective: every rank writes its shards into staging; rank 0 publishes. Returns the folder on rank 0.

    `on_staged(step)` runs on rank 0 between staging and publishing (tests crash there)."""
    import torch.distributed as dist

    root = Path(root)
    tag = checkpoint_tag(state.global_step)
    staged = staging_root(root) / tag
    if rank == 0:
        if staged.exists():  # leftovers of a save that crashed
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(staging_root(root)), tag=tag, save_latest=False)
    save_rng_state(staged, rank)
    dist.barrier()
    published = None
    if rank == 0:
        (staged / TRAINER_STATE).write_text(state.to_json())
        if on_staged is not None:
            on_staged(state.global_step)
        published = publish_checkpoint(root, tag)
    dist.barrier()
    return published


def load_deepspeed_checkpoint(engine, folder: str | Path, rank: int, world_size: int) -> TrainerState:
    """Restore model, optimizer, scheduler (DeepSpeed) and this rank's RNG from a published checkpoint."""
    folder = Path(folder)
    state_path = folder / TRAINER_STATE
    if not state_path.is_file():
        raise TrainingCheckpointError(f"{state_path} is missing: {folder} is not a complete checkpoint")
    state = TrainerState.from_json(state_path.read_text())
    if state.world_size != world_size:
        raise TrainingCheckpointError(
            f"{folder} was written by {state.world_size} ranks but this run has {world_size}; "
            "resume with the same number of processes (the data order and ZeRO shards depend on it)"
        )
    load_path, _ = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise TrainingCheckpointError(f"DeepSpeed could not load the checkpoint in {folder}")
    load_rng_state(folder, rank)
    return state


# --------------------------------------------------------------------------- export


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float, adapter: str = "default") -> dict:
    """A peft LoRA model's state dict -> the plain model's, with W += scaling * B @ A merged in.

    Names lose peft's `base_model.model.` prefix and `.base_layer`; LoRA tensors are dropped.
    """
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name:
            continue
        plain = name[len(prefix):] if name.startswith(prefix) else name
        plain = plain.replace(".base_layer.", ".")
        merged[plain] = tensor
    for name, lora_a in state_dict.items():
        if not name.endswith(f".lora_A.{adapter}.weight"):
            continue
        stem = name[: -len(f".lora_A.{adapter}.weight")]
        lora_b = state_dict[f"{stem}.lora_B.{adapter}.weight"]
        base_name = (stem[len(prefix):] if stem.startswith(prefix) else stem) + ".weight"
        base = merged[base_name]
        delta = (lora_b.float() @ lora_a.float()) * scaling
        merged[base_name] = (base.float() + delta).to(base.dtype)
    return merged


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) module state dict on rank 0, None elsewhere. Collective under ZeRO-3."""
    import torch.distributed as dist

    if engine.zero_optimization_stage() == 3:
        # Gathers one module at a time; only rank 0 keeps the CPU copy.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.get_rank() == 0 else None
    if state is None:
        return None
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _replace_folder(tmp: Path, out_dir: Path) -> Path:
    """Put the finished folder `tmp` in place of `out_dir`: fsynced, then renamed, so that a crash
    leaves either the old folder or the new one."""
    fsync_tree(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        shutil.rmtree(old)
    os.replace(tmp, out_dir)
    _fsync_path(out_dir.parent)
    return out_dir


def export_hf_folder(model, state_dict: dict, out_dir: str | Path, tokenizer=None, image_processor=None) -> Path:
    """Write config + safetensors (+ tokenizer, image processor) to `out_dir` atomically (rank 0 only).

    `model` supplies the config and save logic (a plain, non-peft model); `state_dict` the weights.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if image_processor is not None and hasattr(image_processor, "save_pretrained"):
        image_processor.save_pretrained(tmp)
    return _replace_folder(tmp, out_dir)


def average_exports(sources: list[tuple[str | Path, float]], out_dir: str | Path) -> Path:
    """Write the weighted average of exported models ("a soup": fine-tunes of one model) to `out_dir`
    atomically: a copy of the first folder (config, tokenizer, processor) with the averaged
    `model.safetensors`. Averaged in float64, stored in each tensor's own dtype; integer tensors
    must agree. Weights are normalised."""
    from safetensors.torch import load_file, save_file

    if not sources or not all(0 < w < float("inf") for _, w in sources):
        raise TrainingCheckpointError("average_exports: needs at least one model, each with a finite weight > 0")
    folders = [Path(f) for f, _ in sources]
    for folder in folders:
        if not (folder / "model.safetensors").is_file():
            raise TrainingCheckpointError(f"average_exports: {folder / 'model.safetensors'} does not exist")
    total = sum(w for _, w in sources)
    first = load_file(str(folders[0] / "model.safetensors"))
    sums = {k: v.double() * sources[0][1] if v.is_floating_point() else v for k, v in first.items()}
    for folder, (_, weight) in zip(folders[1:], sources[1:]):
        state = load_file(str(folder / "model.safetensors"))
        if state.keys() != first.keys():
            raise TrainingCheckpointError(f"average_exports: {folder} holds other tensors than {folders[0]}")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise TrainingCheckpointError(f"average_exports: {key}: shape {tuple(value.shape)} in {folder}, "
                                              f"{tuple(first[key].shape)} in {folders[0]}")
            if value.is_floating_point():
                sums[key] += value.double() * weight
            elif not torch.equal(value, first[key]):
                raise TrainingCheckpointError(f"average_exports: {key}: integer tensor differs in {folder}")
    averaged = {k: (v / total).to(first[k].dtype) if v.is_floating_point() else v for k, v in sums.items()}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(folders[0], tmp)
    save_file(averaged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return _replace_folder(tmp, out_dir)
