"""Bilinear point features (grid_sample, align_corners=True, zero padding) as Triton kernels.

Forward: one program per (region, block of points, block of channels) gathers the four corner rows
of its region's map and blends them in fp32. Backward: scatters the blended gradient back to the
four corners with fp32 atomics. Layouts as `reference.point_features`: "official" reads the
transposed location (row from x, column from y), "aligned" the true one.

The maps get an exact gradient; points needing one are routed to the reference (see below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import check_device, next_power_of_2

__all__ = ["point_features", "bilinear_corners"]


@triton.jit
def bilinear_corners(px, py, side, OFFICIAL: tl.constexpr):
    """Corner cells and weights of normalised points, in grid_sample's own arithmetic order."""
    if OFFICIAL:
        gx = 2.0 * py - 1.0
        gy = 2.0 * px - 1.0
    else:
        gx = 2.0 * px - 1.0
        gy = 2.0 * py - 1.0
    ix = (gx + 1.0) / 2.0 * (side - 1)
    iy = (gy + 1.0) / 2.0 * (side - 1)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    x1f = x0f + 1.0
    y1f = y0f + 1.0
    w00 = (x1f - ix) * (y1f - iy)
    w01 = (ix - x0f) * (y1f - iy)
    w10 = (x1f - ix) * (iy - y0f)
    w11 = (ix - x0f) * (iy - y0f)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    return x0, y0, w00, w01, w10, w11


@triton.jit
def _corner(map_base, x, y, side, channels, c_offsets, c_valid, p_valid):
    inside = p_valid & (x >= 0) & (x < side) & (y >= 0) & (y < side)
    cell = (y * side + x).to(tl.int64)
    ptrs = map_base + cell[:, None] * channels + c_offsets[None, :]
    return tl.load(ptrs, mask=inside[:, None] & c_valid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _point_features_fwd(
    maps_ptr, points_ptr, image_ptr, out_ptr, num_points, channels, side,
    OFFICIAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    region = tl.program_id(0).to(tl.int64)
    p_offsets = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_offsets = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_valid = p_offsets < num_points
    c_valid = c_offsets < channels
    point_base = points_ptr + region * num_points * 2
    px = tl.load(point_base + p_offsets * 2, mask=p_valid, other=0.0).to(tl.float32)
    py = tl.load(point_base + p_offsets * 2 + 1, mask=p_valid, other=0.0).to(tl.float32)
    x0, y0, w00, w01, w10, w11 = bilinear_corners(px, py, side, OFFICIAL)
    image = tl.load(image_ptr + region).to(tl.int64)
    map_base = maps_ptr + image * side * side * channels
    acc = _corner(map_base, x0, y0, side, channels, c_offsets, c_valid, p_valid) * w00[:, None]
    acc += _corner(map_base, x0 + 1, y0, side, channels, c_offsets, c_valid, p_valid) * w01[:, None]
    acc += _corner(map_base, x0, y0 + 1, side, channels, c_offsets, c_valid, p_valid) * w10[:, None]
    acc += _corner(map_base, x0 + 1, y0 + 1, side, channels, c_offsets, c_valid, p_valid) * w11[:, None]
    out_ptrs = out_ptr + (region * num_points + p_offsets.to(tl.int64))[:, None] * channels + c_offsets[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_valid[:, None] & c_valid[None, :])


@triton.jit
def _scatter_corner(grad_base, x, y, side, channels, c_offsets, c_valid, p_valid, values):
    inside = p_valid & (x >= 0) & (x < side) & (y >= 0) & (y < side)
    cell = (y * side + x).to(tl.int64)
    ptrs = grad_base + cell[:, None] * channels + c_offsets[None, :]
    tl.atomic_add(ptrs, values, mask=inside[:, None] & c_valid[None, :])


@triton.jit
def _point_features_bwd(
    grad_out_ptr, points_ptr, image_ptr, grad_maps_ptr, num_points, channels, side,
    OFFICIAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    region = tl.program_id(0).to(tl.int64)
    p_offsets = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_offsets = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_valid = p_offsets < num_points
    c_valid = c_offsets < channels
    point_base = points_ptr + region * num_points * 2
    px = tl.load(point_base + p_offsets * 2, mask=p_valid, other=0.0).to(tl.float32)
    py = tl.load(point_base + p_offsets * 2 + 1, mask=p_valid, other=0.0).to(tl.float32)
    x0, y0, w00, w01, w10, w11 = bilinear_corners(px, py, side, OFFICIAL)
    grad_ptrs = grad_out_ptr + (region * num_points + p_offsets.to(tl.int64))[:, None] * channels + c_offsets[None, :]
    grad = tl.load(grad_ptrs, mask=p_valid[:, None] & c_valid[None, :], other=0.0).to(tl.float32)
    image = tl.load(image_ptr + region).to(tl.int64)
    grad_base = grad_maps_ptr + image * side * side * channels
    _scatter_corner(grad_base, x0, y0, side, channels, c_offsets, c_valid, p_valid, grad * w00[:, None])
    _scatter_corner(grad_base, x0 + 1, y0, side, channels, c_offsets, c_valid, p_valid, grad * w01[:, None])
    _scatter_corner(grad_base, x0, y0 + 1, side, channels, c_offsets, c_valid, p_valid, grad * w10[:, None])
    _scatter_corner(grad_base, x0 + 1, y0 + 1, side, channels, c_offsets, c_valid, p_valid, grad * w11[:, None])


def _grid(num_regions: int, num_points: int, channels: int) -> tuple[tuple[int, int, int], int, int]:
    block_c = min(128, next_power_of_2(channels))
    block_p = min(32, next_power_of_2(num_points))
    return (num_regions, triton.cdiv(num_points, block_p), triton.cdiv(channels, block_c)), block_p, block_c


class _PointFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feature_maps, points, image_index, side: int, official: bool):
        num_regions, num_points, _ = points.shape
        channels = feature_maps.shape[-1]
        out = torch.empty(num_regions, num_points, channels, dtype=feature_maps.dtype, device=feature_maps.device)
        grid, block_p, block_c = _grid(num_regions, num_points, channels)
        if num_regions and num_points:
            _point_features_fwd[grid](
                feature_maps, points, image_index, out, num_points, channels, side,
                OFFICIAL=official, BLOCK_P=block_p, BLOCK_C=block_c,
            )
        ctx.save_for_backward(points, image_index)
        ctx.meta = (feature_maps.shape, feature_maps.dtype, side, official)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        points, image_index = ctx.saved_tensors
        maps_shape, maps_dtype, side, official = ctx.meta
        grad_maps = torch.zeros(maps_shape, dtype=torch.float32, device=grad_out.device)
        num_regions, num_points, _ = points.shape
        grid, block_p, block_c = _grid(num_regions, num_points, maps_shape[-1])
        if num_regions and num_points:
            _point_features_bwd[grid](
                grad_out.contiguous(), points, image_index, grad_maps, num_points, maps_shape[-1], side,
                OFFICIAL=official, BLOCK_P=block_p, BLOCK_C=block_c,
            )
        return grad_maps.to(maps_dtype), None, None, None, None


def point_features(
    feature_maps: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor, layout: str = "official"
) -> torch.Tensor:
    """Same contract as `reference.point_features`. The kernel's backward gives the maps their
    gradient; points that require one (never the case for mask-sampled points) go through the
    reference's grid_sample instead, so no gradient is silently dropped."""
    if points.requires_grad and torch.is_grad_enabled():
        return reference.point_features(feature_maps, points, image_index, layout)
    if layout not in reference.LAYOUTS:
        raise ValueError(f"layout must be one of {reference.LAYOUTS}, got {layout!r}")
    side = reference._grid_side(feature_maps)
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, N, 2], got shape {tuple(points.shape)}")
    reference._check_image_index(image_index, points.shape[0], feature_maps.shape[0])
    check_device(feature_maps, points)
    return _PointFeatures.apply(
        feature_maps.contiguous(), points.detach().float().contiguous(), image_index.to(torch.int64).contiguous(),
        side, layout == "official",
    )
