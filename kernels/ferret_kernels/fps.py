"""Farthest-point sampling as one Triton program per region.

Each program keeps its region's coordinates and running nearest-anchor distances in registers
(N <= BLOCK_N) and loops over the samples: store the current index, update the distances, argmax
with ties -> lowest index (as `reference.farthest_point_sample`). No host synchronisation: the
start indices are a device tensor (random ones drawn from a torch.Generator on the device).
Compiled without multiply-add fusion (EXACT_FP): dx*dx + dy*dy must round like torch's two
products and one add, or a near-tie picks another anchor and every later step differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import EXACT_FP, check_device, device_guard, next_power_of_2

__all__ = ["farthest_point_sample"]


@triton.jit
def _fps_kernel(xy_ptr, start_ptr, out_ptr, num_points, num_samples, BLOCK_N: tl.constexpr):
    region = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_N)
    valid = offsets < num_points
    base = xy_ptr + region.to(tl.int64) * num_points * 2
    x = tl.load(base + offsets * 2, mask=valid, other=0.0)
    y = tl.load(base + offsets * 2 + 1, mask=valid, other=0.0)
    # Padding lanes sit at -1 so they can never be the farthest point.
    nearest = tl.where(valid, float("inf"), -1.0)
    current = tl.load(start_ptr + region).to(tl.int32)
    for step in range(num_samples):
        tl.store(out_ptr + region.to(tl.int64) * num_samples + step, current.to(tl.int64))
        cx = tl.load(base + current * 2)
        cy = tl.load(base + current * 2 + 1)
        dx = x - cx
        dy = y - cy
        nearest = tl.minimum(nearest, dx * dx + dy * dy)
        current = tl.argmax(nearest, axis=0, tie_break_left=True).to(tl.int32)


def farthest_point_sample(
    xy: torch.Tensor,
    num_samples: int,
    start_index: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Same contract as `reference.farthest_point_sample` (fp32 geometry, ties -> lowest index)."""
    if xy.dim() != 3 or xy.shape[-1] != 2:
        raise ValueError(f"xy must be [R, N, 2], got shape {tuple(xy.shape)}")
    num_regions, num_points, _ = xy.shape
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"num_samples must be in [1, {num_points}], got {num_samples}")
    start = reference._start_index(start_index, num_regions, num_points, xy.device, generator)
    check_device(xy, start)
    coords = xy.detach().float().contiguous()
    out = torch.empty(num_regions, num_samples, dtype=torch.long, device=xy.device)
    if num_regions == 0:
        return out
    block = next_power_of_2(num_points)
    with device_guard(xy):
        _fps_kernel[(num_regions,)](
            coords, start.contiguous(), out, num_points, num_samples,
            BLOCK_N=block, num_warps=4 if block <= 1024 else 8, **EXACT_FP,
        )
    return out
