"""Shared Triton plumbing: interpreter detection, block sizes, input checks.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors through
Triton's interpreter: that is how the CPU test-suite exercises them.
"""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "next_power_of_2", "check_device", "int32_index"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    for tensor in tensors:
        if tensor.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"the Triton backend needs CUDA tensors (got {tensor.device}); set TRITON_INTERPRET=1 "
                "before importing triton to run it on CPU, or use backend='fast'"
            )


def int32_index(index: torch.Tensor) -> torch.Tensor:
    return index.to(torch.int32).contiguous()
