"""Mask-average pooling (the released `region_fea_adapter` feature) as Triton kernels.

Pixels are chosen as in `mask_points` (min(N, P) distinct mask pixels, uniform, no replacement;
every pixel when N is None), then one program per (region, channel block) walks them in blocks,
blends the four bilinear corners of each into a [BLOCK_P, BLOCK_C] fp32 tile and reduces it once
at the end -- the [R, N, C] point features are never built. Backward scatters grad / count to the
corners with relaxed fp32 atomics, one program per (block of pixels, region, channel block): the
pixel blocks go on grid axis 0, the only axis allowed more than 65535 blocks (a 4-megapixel mask
pooled over every pixel has 262144 blocks of 16). Under torch.use_deterministic_algorithms(True)
the backward is torch instead: a [cells, regions] weight matrix built by index_add_ (deterministic
on CUDA in that mode), times the per-region gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import folded, reference
from ._triton import blocks, check_device, deterministic, device_guard, next_power_of_2
from .params import FEATURE_LAYOUTS
from .folded import pack_masks, pick_mask_pixels
from .point_features_kernel import _corner, _scatter_corner, bilinear_corners

__all__ = ["mask_average_pool"]

MAX_GRID_YZ = 65535


@triton.jit
def _slot_points(picked_ptr, counts_ptr, sizes_ptr, region, slots, num_picked, padded_height):
    count = tl.minimum(tl.load(counts_ptr + region), num_picked)
    valid = slots < count
    pixel = tl.load(picked_ptr + region * num_picked + slots, mask=valid, other=0)
    width = tl.load(sizes_ptr + region * 2).to(tl.float32)
    height = tl.load(sizes_ptr + region * 2 + 1).to(tl.float32)
    # IEEE division, as torch's x / W (Triton's `/` is the approximate div.full.f32).
    px = tl.math.div_rn((pixel // padded_height).to(tl.float32), width)
    py = tl.math.div_rn((pixel % padded_height).to(tl.float32), height)
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
    map_base = maps_ptr + image * (side * side * channels)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    count = tl.minimum(tl.load(counts_ptr + region), num_picked)
    for p0 in range(0, count, BLOCK_P):
        slots = p0 + tl.arange(0, BLOCK_P)
        px, py, valid, _ = _slot_points(picked_ptr, counts_ptr, sizes_ptr, region, slots, num_picked, padded_height)
        x0, y0, w00, w01, w10, w11 = bilinear_corners(px, py, side, OFFICIAL)
        acc += _corner(map_base, x0, y0, side, channels, c_offsets, c_valid, valid) * w00[:, None]
        acc += _corner(map_base, x0 + 1, y0, side, channels, c_offsets, c_valid, valid) * w01[:, None]
        acc += _corner(map_base, x0, y0 + 1, side, channels, c_offsets, c_valid, valid) * w10[:, None]
        acc += _corner(map_base, x0 + 1, y0 + 1, side, channels, c_offsets, c_valid, valid) * w11[:, None]
    mean = tl.math.div_rn(tl.sum(acc, axis=0), tl.zeros([BLOCK_C], dtype=tl.float32) + count.to(tl.float32))
    tl.store(out_ptr + region * channels + c_offsets, mean, mask=c_valid)


@triton.jit
def _mask_pool_bwd(
    grad_out_ptr, picked_ptr, counts_ptr, sizes_ptr, image_ptr, grad_maps_ptr,
    num_picked, padded_height, channels, side,
    OFFICIAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    slot0 = tl.program_id(0) * BLOCK_P
    region = tl.program_id(1).to(tl.int64)
    # Blocks past the region's pixel count (most of them when every pixel of a large padded mask
    # is a slot) have nothing to scatter.
    if slot0 < tl.minimum(tl.load(counts_ptr + region), num_picked):
        slots = slot0 + tl.arange(0, BLOCK_P)
        c_offsets = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_valid = c_offsets < channels
        px, py, valid, count = _slot_points(picked_ptr, counts_ptr, sizes_ptr, region, slots, num_picked, padded_height)
        grad = tl.load(grad_out_ptr + region * channels + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        grad = tl.math.div_rn(grad, tl.zeros([BLOCK_C], dtype=tl.float32) + count.to(tl.float32))
        image = tl.load(image_ptr + region).to(tl.int64)
        grad_base = grad_maps_ptr + image * (side * side * channels)
        x0, y0, w00, w01, w10, w11 = bilinear_corners(px, py, side, OFFICIAL)
        _scatter_corner(grad_base, x0, y0, side, channels, c_offsets, c_valid, valid, w00[:, None] * grad[None, :])
        _scatter_corner(grad_base, x0 + 1, y0, side, channels, c_offsets, c_valid, valid, w01[:, None] * grad[None, :])
        _scatter_corner(grad_base, x0, y0 + 1, side, channels, c_offsets, c_valid, valid, w10[:, None] * grad[None, :])
        _scatter_corner(grad_base, x0 + 1, y0 + 1, side, channels, c_offsets, c_valid, valid, w11[:, None] * grad[None, :])


def _backward_deterministic(grad_out, picked, counts, sizes, image_index, maps_shape, padded_height, side, official):
    """The kernel's backward in torch with no float atomics: W[cell, region] = sum of the region's
    corner weights / count at that cell (index_add_), then grad_maps = W @ grad_out."""
    num_regions, num_picked = picked.shape
    take = counts.clamp(max=num_picked)
    points = folded.finish_points_torch(picked, counts, torch.zeros(picked.shape, device=picked.device), sizes, padded_height)
    cells, weights = folded.bilinear_corners(points, side, "official" if official else "aligned", torch.float32)
    valid = torch.arange(num_picked, device=picked.device) < take[:, None]
    weights = weights * valid / take[:, None]
    regions = torch.arange(num_regions, device=picked.device)[:, None]
    slots = ((cells + (image_index * side * side)[:, None]) * num_regions + regions).reshape(-1)
    num_cells = maps_shape[0] * side * side
    matrix = torch.zeros(num_cells * num_regions, device=picked.device).index_add_(0, slots, weights.reshape(-1))
    return (matrix.view(num_cells, num_regions) @ grad_out.float()).view(maps_shape)


class _MaskPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feature_maps, picked, counts, sizes, image_index, padded_height: int, side: int, official: bool):
        num_regions, num_picked = picked.shape
        channels = feature_maps.shape[-1]
        if side * side * channels >= 2**31:
            raise ValueError(f"a feature map ({side}x{side}x{channels}) exceeds int32 offsets")
        if num_regions > MAX_GRID_YZ:
            raise ValueError(f"at most {MAX_GRID_YZ} regions per call, got {num_regions}")
        out = torch.empty(num_regions, channels, dtype=torch.float32, device=feature_maps.device)
        config = blocks("mask_pool_fwd", BLOCK_P=min(16, next_power_of_2(num_picked)), BLOCK_C=min(128, next_power_of_2(channels)), num_warps=4)
        with device_guard(feature_maps):
            _mask_pool_fwd[(num_regions, triton.cdiv(channels, config["BLOCK_C"]))](
                feature_maps, picked, counts, sizes, image_index, out, num_picked, padded_height, channels, side,
                OFFICIAL=official, **config,
            )
        ctx.save_for_backward(picked, counts, sizes, image_index)
        ctx.meta = (feature_maps.shape, feature_maps.dtype, padded_height, side, official)
        return out.to(feature_maps.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        picked, counts, sizes, image_index = ctx.saved_tensors
        maps_shape, maps_dtype, padded_height, side, official = ctx.meta
        if deterministic():
            grad_maps = _backward_deterministic(grad_out, picked, counts, sizes, image_index, maps_shape, padded_height, side, official)
            return grad_maps.to(maps_dtype), None, None, None, None, None, None, None
        num_regions, num_picked = picked.shape
        channels = maps_shape[-1]
        grad_maps = torch.zeros(maps_shape, dtype=torch.float32, device=grad_out.device)
        # Four atomic [BLOCK_P, BLOCK_C] scatters: a small tile keeps sm_80 free of spills.
        config = blocks("mask_pool_bwd", BLOCK_P=min(16, next_power_of_2(num_picked)), BLOCK_C=min(64, next_power_of_2(channels)), num_warps=4)
        grid = (triton.cdiv(num_picked, config["BLOCK_P"]), num_regions, triton.cdiv(channels, config["BLOCK_C"]))
        with device_guard(grad_maps):
            _mask_pool_bwd[grid](
                grad_out.contiguous(), picked, counts, sizes, image_index, grad_maps,
                num_picked, padded_height, channels, side, OFFICIAL=official, **config,
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
    if layout not in FEATURE_LAYOUTS:
        raise ValueError(f"layout must be one of {FEATURE_LAYOUTS}, got {layout!r}")
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be >= 1 or None, got {num_points}")
    side = reference._grid_side(feature_maps)
    packed, sizes = pack_masks(masks)
    # The collator's masks live on the CPU: move them first, then check what the kernels will read.
    packed, sizes = packed.to(feature_maps.device), sizes.to(feature_maps.device)
    reference._check_image_index(image_index, packed.shape[0], feature_maps.shape[0])
    check_device(feature_maps, packed, image_index)
    limit = packed.shape[1] * packed.shape[2] if num_points is None else num_points
    picked, counts, _ = pick_mask_pixels(packed, limit, generator)
    return _MaskPool.apply(
        feature_maps.contiguous(), picked.contiguous(), counts.contiguous(), sizes.contiguous(),
        image_index.to(torch.int64).contiguous(), packed.shape[2], side, layout == "official",
    )
