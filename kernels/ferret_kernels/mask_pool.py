"""Mask-average pooling (the released `region_fea_adapter` feature) as Triton kernels.

Pixels are chosen as in `mask_points` (min(N, P) distinct mask pixels, uniform, no replacement;
every pixel when N is None), then one program per (region, channel block) walks them in blocks,
blends the four bilinear corners of each and accumulates the mean in fp32 — the [R, N, C] point
features are never built. Backward scatters grad / count to the corners with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import check_device, interpreting, next_power_of_2
from .fast import pack_masks, pick_mask_pixels
from .point_features_kernel import bilinear_corners

__all__ = ["mask_average_pool"]


@triton.jit
def _slot_points(picked_ptr, counts_ptr, sizes_ptr, region, slots, num_picked, padded_height):
    count = tl.minimum(tl.load(counts_ptr + region), num_picked)
    valid = slots < count
    pixel = tl.load(picked_ptr + region * num_picked + slots, mask=valid, other=0)
    width = tl.load(sizes_ptr + region * 2).to(tl.float32)
    height = tl.load(sizes_ptr + region * 2 + 1).to(tl.float32)
    px = (pixel // padded_height).to(tl.float32) / width
    py = (pixel % padded_height).to(tl.float32) / height
    return px, py, valid, count


@triton.jit
def _mask_pool_fwd(
    maps_ptr, picked_ptr, counts_ptr, sizes_ptr, image_ptr, out_ptr,
    num_picked, padded_height, channels, side,
    OFFICIAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    region = tl.program_id(0).to(tl.int64)
    c_offsets = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c_offsets < channels
    image = tl.load(image_ptr + region).to(tl.int64)
    map_base = maps_ptr + image * side * side * channels
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.minimum(tl.load(counts_ptr + region), num_picked)
    for p0 in range(0, num_picked, BLOCK_P):
        slots = p0 + tl.arange(0, BLOCK_P)
        px, py, valid, count = _slot_points(picked_ptr, counts_ptr, sizes_ptr, region, slots, num_picked, padded_height)
        x0, y0, w00, w01, w10, w11 = bilinear_corners(px, py, side, OFFICIAL)
        for dy in range(2):
            for dx in range(2):
                x = x0 + dx
                y = y0 + dy
                weight = tl.where(dx == 0, tl.where(dy == 0, w00, w10), tl.where(dy == 0, w01, w11))
                inside = valid & (x >= 0) & (x < side) & (y >= 0) & (y < side)
                cell = (y * side + x).to(tl.int64)
                values = tl.load(
                    map_base + cell[:, None] * channels + c_offsets[None, :],
                    mask=inside[:, None] & c_valid[None, :], other=0.0,
                ).to(tl.float32)
                acc += tl.sum(values * weight[:, None], axis=0)
    tl.store(out_ptr + region * channels + c_offsets, acc / count.to(tl.float32), mask=c_valid)


@triton.jit
def _mask_pool_bwd(
    grad_out_ptr, picked_ptr, counts_ptr, sizes_ptr, image_ptr, grad_maps_ptr,
    num_picked, padded_height, channels, side,
    OFFICIAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    region = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_offsets = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c_offsets < channels
    px, py, valid, count = _slot_points(picked_ptr, counts_ptr, sizes_ptr, region, slots, num_picked, padded_height)
    grad = tl.load(grad_out_ptr + region * channels + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
    grad = grad / count.to(tl.float32)
    image = tl.load(image_ptr + region).to(tl.int64)
    grad_base = grad_maps_ptr + image * side * side * channels
    x0, y0, w00, w01, w10, w11 = bilinear_corners(px, py, side, OFFICIAL)
    for dy in range(2):
        for dx in range(2):
            x = x0 + dx
            y = y0 + dy
            weight = tl.where(dx == 0, tl.where(dy == 0, w00, w10), tl.where(dy == 0, w01, w11))
            inside = valid & (x >= 0) & (x < side) & (y >= 0) & (y < side)
            cell = (y * side + x).to(tl.int64)
            tl.atomic_add(
                grad_base + cell[:, None] * channels + c_offsets[None, :],
                weight[:, None] * grad[None, :],
                mask=inside[:, None] & c_valid[None, :],
            )


class _MaskPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feature_maps, picked, counts, sizes, image_index, padded_height: int, side: int, official: bool):
        num_regions, num_picked = picked.shape
        channels = feature_maps.shape[-1]
        out = torch.empty(num_regions, channels, dtype=torch.float32, device=feature_maps.device)
        block_c = min(128, next_power_of_2(channels))
        block_p = next_power_of_2(num_picked) if interpreting() else min(64, next_power_of_2(num_picked))
        _mask_pool_fwd[(num_regions, triton.cdiv(channels, block_c))](
            feature_maps, picked, counts, sizes, image_index, out, num_picked, padded_height, channels, side,
            OFFICIAL=official, BLOCK_P=block_p, BLOCK_C=block_c,
        )
        ctx.save_for_backward(picked, counts, sizes, image_index)
        ctx.meta = (feature_maps.shape, feature_maps.dtype, padded_height, side, official, block_p, block_c)
        return out.to(feature_maps.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        picked, counts, sizes, image_index = ctx.saved_tensors
        maps_shape, maps_dtype, padded_height, side, official, block_p, block_c = ctx.meta
        num_regions, num_picked = picked.shape
        grad_maps = torch.zeros(maps_shape, dtype=torch.float32, device=grad_out.device)
        grid = (num_regions, triton.cdiv(num_picked, block_p), triton.cdiv(maps_shape[-1], block_c))
        _mask_pool_bwd[grid](
            grad_out.contiguous(), picked, counts, sizes, image_index, grad_maps,
            num_picked, padded_height, maps_shape[-1], side,
            OFFICIAL=official, BLOCK_P=block_p, BLOCK_C=block_c,
        )
        return grad_maps.to(maps_dtype), None, None, None, None, None, None, None


def mask_average_pool(
    feature_maps: torch.Tensor,
    masks,
    image_index: torch.Tensor,
    num_points: int | None = 512,
    layout: str = "official",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Same contract as `reference.mask_average_pool` -> [R, C] in the feature dtype."""
    if layout not in reference.LAYOUTS:
        raise ValueError(f"layout must be one of {reference.LAYOUTS}, got {layout!r}")
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be >= 1 or None, got {num_points}")
    side = reference._grid_side(feature_maps)
    packed, sizes = pack_masks(masks)
    reference._check_image_index(image_index, packed.shape[0], feature_maps.shape[0])
    check_device(feature_maps, packed)
    limit = packed.shape[1] * packed.shape[2] if num_points is None else num_points
    picked, counts, _ = pick_mask_pixels(packed.to(feature_maps.device), limit, generator)
    return _MaskPool.apply(
        feature_maps.contiguous(), picked.contiguous(), counts.contiguous(), sizes.to(feature_maps.device).contiguous(),
        image_index.to(torch.int64).contiguous(), packed.shape[2], side, layout == "official",
    )
