"""The run's processes and devices: torchrun's environment, the DeepSpeed config, batches on the device."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ferret.training.config import TrainConfig, TrainConfigError, resolve_path


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def init_distributed() -> Processes:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (a plain `python` run is 1 process); nccl on GPU, gloo on CPU."""
    import deepspeed
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, default)
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Weights in bf16? `train.precision`: bf16, or auto (bf16 on GPU, fp32 on CPU)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def precision_name(precision: str, device: torch.device) -> str:
    """What `train.precision` means on this device: bf16 (bf16 weights), bf16-mixed (fp32 weights,
    bf16 matmuls under autocast; on a CPU with avx512_bf16 an LLM step takes ~0.76x the fp32 step's
    time, session 39) or fp32."""
    return "bf16" if uses_bf16(precision, device) else "bf16-mixed" if precision == "bf16-mixed" else "fp32"


def bf16_autocast(precision: str, device: torch.device, bf16_weights_too: bool = True) -> torch.autocast:
    """bf16 autocast for a reduced-precision run: bf16-mixed always; bf16 weights only where asked (the
    vision warm-up; the DeepSpeed step computes bf16 weights in bf16 without it)."""
    name = precision_name(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=name == "bf16-mixed" or (name == "bf16" and bf16_weights_too))


def deepspeed_config(cfg: TrainConfig, micro: int, accum: int, bf16: bool) -> dict:
    path = resolve_path(cfg.train.deepspeed)
    if not Path(path).is_file():
        raise TrainConfigError(f"train.deepspeed: DeepSpeed config {path} not found")
    with open(path) as handle:
        ds = json.load(handle)
    # The training config owns these; the json keeps only ZeRO/communication settings ("auto").
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds["bf16"] = {"enabled": bf16}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def gather_region_module_whole(model, ds_config: dict, on_gpu: bool) -> None:
    """Under ZeRO-3 on GPU, gather the region module as one leaf: it reads its sub-modules' weights
    directly (folded kernels), so ZeRO-3 must not hook each child. (Not on CPU: DeepSpeed 0.19's
    leaf path calls record_stream on CPU gradients and fails; the small CPU models keep every
    region weight below the persistence threshold anyway.)"""
    from ferret.training.model_setup import unwrap

    region_module = unwrap(model).model.region_module
    if on_gpu and ds_config.get("zero_optimization", {}).get("stage") == 3 and region_module is not None:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(region_module)])


def move_batch(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    """Model inputs on the device; pixel values in the compute dtype, masks stay bool."""
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].long().to(device),
        "labels": batch["labels"].to(device),
        "region_masks": [[m.to(device) for m in masks] for masks in batch["region_masks"]],
    }
    if "pixel_values" in batch:
        inputs["images"] = batch["pixel_values"].to(device=device, dtype=float_dtype)
    return inputs
