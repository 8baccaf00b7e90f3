"""Shared Triton plumbing: interpreter detection, block sizes, input checks, launch context.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors through
Triton's interpreter: that is how the CPU test-suite exercises them. The launchers pick the same
block sizes there as on a GPU; tests inject others through `BLOCK_OVERRIDES` (see `blocks`).
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = [
    "interpreting",
    "next_power_of_2",
    "check_device",
    "device_guard",
    "blocks",
    "BLOCK_OVERRIDES",
    "EXACT_FP",
    "deterministic",
    "num_programs_cap",
]

# kernel name -> {constexpr or num_warps: value}, applied over the launcher's choice (tests only).
BLOCK_OVERRIDES: dict[str, dict] = {}

# Launch option for kernels whose float results are compared exactly with torch's: no
# multiply-add contraction (torch rounds a*b + c twice; Triton 3.9 fuses by default).
EXACT_FP = {"enable_fp_fusion": False}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def blocks(kernel_name: str, **config) -> dict:
    """The launcher's constexprs / num_warps for one kernel, with any test override applied."""
    return {**config, **BLOCK_OVERRIDES.get(kernel_name, {})}


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors (or CPU tensors under the interpreter), all on one device."""
    for tensor in tensors:
        if tensor.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"the Triton backend needs CUDA tensors (got {tensor.device}); set TRITON_INTERPRET=1 "
                "before importing triton to run it on CPU, or use backend='fast'"
            )
    devices = {tensor.device for tensor in tensors}
    if len(devices) > 1:
        raise ValueError(f"the Triton kernels' inputs must share one device, got {sorted(map(str, devices))}")


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (a kernel launched on cuda:0 with cuda:1
    pointers faults)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def deterministic() -> bool:
    """torch.use_deterministic_algorithms(True) is on: take the paths without float atomics."""
    return torch.are_deterministic_algorithms_enabled()


def num_programs_cap(device: torch.device, per_sm: int) -> int:
    """Programs for a persistent kernel: `per_sm` per multiprocessor on a GPU (a fixed count, so
    the order of its per-program reductions does not change between runs); 4 under the interpreter."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm
