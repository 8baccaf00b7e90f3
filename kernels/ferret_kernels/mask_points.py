"""Masks -> sampled points on the device, with no host synchronisation.

Design (shared by the fast and Triton backends, so the same generator gives the same points):
1. Pad the masks to one [R, W, H] block (sizes kept per region) and give every pixel a uniform
   random key from the generator; pixels outside the mask get key -1.
2. top-k (k = min(N, W*H)) of the keys picks min(N, P) distinct mask pixels uniformly (P = the
   mask's pixel count): in random (key) order when P >= N, as the reference's randperm; when P < N
   sorted into raster (= `nonzero()`) order, non-mask picks last.
3. Slot i < min(N, P) takes the i-th picked pixel; when P < N, slot i >= P takes the picked pixel
   of rank floor(u_i * P) for a fresh uniform u_i: every pixel once, then uniform draws with
   replacement, exactly the reference's distribution. Since then all P pixels are in the picked
   list, no prefix sum is needed.
Step 3 (and the (x/W, y/H) normalisation) is a Triton kernel here; steps 1-2 are torch ops on the
device, in `folded` (which also has a torch step 3: the CPU route). The division is IEEE (div_rn:
Triton's `/` compiles to the 2-ulp div.full.f32), so the points equal the fast path's bit for bit.
An empty mask raises ValueError naming the region on CPU; on CUDA a device-side assert fires
(checking on the host would need a synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import check_device, device_guard, next_power_of_2
from .folded import pack_masks, pick_mask_pixels

__all__ = ["sample_mask_points"]


@triton.jit
def _finish_points_kernel(
    picked_ptr, counts_ptr, uniform_ptr, sizes_ptr, out_ptr, num_picked, num_points, padded_height,
    BLOCK: tl.constexpr,
):
    region = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = slots < num_points
    count = tl.load(counts_ptr + region)
    u = tl.load(uniform_ptr + region * num_points + slots, mask=valid, other=0.0)
    drawn = tl.minimum((u * count.to(tl.float32)).to(tl.int64), count - 1)
    rank = tl.where(slots < count, slots, drawn)
    pixel = tl.load(picked_ptr + region * num_picked + rank, mask=valid, other=0)
    width = tl.load(sizes_ptr + region * 2).to(tl.float32)
    height = tl.load(sizes_ptr + region * 2 + 1).to(tl.float32)
    x = (pixel // padded_height).to(tl.float32)
    y = (pixel % padded_height).to(tl.float32)
    base = out_ptr + (region * num_points + slots) * 2
    tl.store(base, tl.math.div_rn(x, width), mask=valid)
    tl.store(base + 1, tl.math.div_rn(y, height), mask=valid)


def sample_mask_points(masks, num_points: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Same contract as `reference.sample_mask_points` (distribution, not draw order): float32
    [R, N, 2] of (x/W, y/H); when a mask has <= N pixels they come first in nonzero() order."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    packed, sizes = pack_masks(masks)
    picked, counts, uniform = pick_mask_pixels(packed, num_points, generator)
    check_device(packed)
    num_regions = packed.shape[0]
    out = torch.empty(num_regions, num_points, 2, dtype=torch.float32, device=packed.device)
    block = min(1024, next_power_of_2(num_points))
    with device_guard(packed):
        _finish_points_kernel[(num_regions, triton.cdiv(num_points, block))](
            picked.contiguous(), counts.contiguous(), uniform.contiguous(), sizes.contiguous(), out,
            picked.shape[1], num_points, packed.shape[2], BLOCK=block,
        )
    return out
