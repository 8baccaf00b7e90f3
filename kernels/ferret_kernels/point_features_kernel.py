"""Bilinear point features (grid_sample, align_corners=True, zero padding) as Triton kernels.

Forward: one program per (region, block of points, block of channels) gathers the four corner rows
of its region's map and blends them in fp32. Backward: scatters the blended gradient back to the
four corners with relaxed fp32 atomics (order-free sums need no acquire/release); under
torch.use_deterministic_algorithms(True) it is torch's deterministic index_add_ instead
(`folded.scatter_corners`). Layouts as `reference.point_features`: "official" reads the transposed
location (row from x, column from y), "aligned" the true one.

Addressing: one int64 base pointer per map / output row block, int32 offsets inside it (a tile of
64-bit pointers costs two registers per element; the launcher checks the offsets fit).

The maps get an exact gradient; points needing one are routed to the reference (see below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import folded, reference
from ._triton import blocks, check_device, deterministic, device_guard, next_power_of_2
from .params import FEATURE_LAYOUTS

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
    ix = (gx + 1.0) * 0.5 * (side - 1)  # * 0.5 == / 2.0 exactly, without a division instruction
    iy = (gy + 1.0) * 0.5 * (side - 1)
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
    offsets = (y * side + x)[:, None] * channels + c_offsets[None, :]  # int32 within one map
    return tl.load(map_base + offsets, mask=inside[:, None] & c_valid[None, :], other=0.0).to(tl.float32)


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
    map_base = maps_ptr + image * (side * side * channels)
    acc = _corner(map_base, x0, y0, side, channels, c_offsets, c_valid, p_valid) * w00[:, None]
    acc += _corner(map_base, x0 + 1, y0, side, channels, c_offsets, c_valid, p_valid) * w01[:, None]
    acc += _corner(map_base, x0, y0 + 1, side, channels, c_offsets, c_valid, p_valid) * w10[:, None]
    acc += _corner(map_base, x0 + 1, y0 + 1, side, channels, c_offsets, c_valid, p_valid) * w11[:, None]
    out_base = out_ptr + region * num_points * channels
    out_offsets = p_offsets[:, None] * channels + c_offsets[None, :]
    tl.store(out_base + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=p_valid[:, None] & c_valid[None, :])


@triton.jit
def _scatter_corner(grad_base, x, y, side, channels, c_offsets, c_valid, p_valid, values):
    inside = p_valid & (x >= 0) & (x < side) & (y >= 0) & (y < side)
    offsets = (y * side + x)[:, None] * channels + c_offsets[None, :]
    tl.atomic_add(grad_base + offsets, values, mask=inside[:, None] & c_valid[None, :], sem="relaxed")


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
    grad_base_out = grad_out_ptr + region * num_points * channels
    grad_offsets = p_offsets[:, None] * channels + c_offsets[None, :]
    grad = tl.load(grad_base_out + grad_offsets, mask=p_valid[:, None] & c_valid[None, :], other=0.0).to(tl.float32)
    image = tl.load(image_ptr + region).to(tl.int64)
    grad_base = grad_maps_ptr + image * (side * side * channels)
    _scatter_corner(grad_base, x0, y0, side, channels, c_offsets, c_valid, p_valid, grad * w00[:, None])
    _scatter_corner(grad_base, x0 + 1, y0, side, channels, c_offsets, c_valid, p_valid, grad * w01[:, None])
    _scatter_corner(grad_base, x0, y0 + 1, side, channels, c_offsets, c_valid, p_valid, grad * w10[:, None])
    _scatter_corner(grad_base, x0 + 1, y0 + 1, side, channels, c_offsets, c_valid, p_valid, grad * w11[:, None])


# (BLOCK_P, BLOCK_C) caps: the backward's four atomic [BLOCK_P, BLOCK_C] scatters need a smaller
# tile than the forward's loads to stay clear of spills on sm_80 (bench/results/ptxas_report.json).
_TILES = {"point_features_fwd": (32, 128), "point_features_bwd": (16, 64)}


def _launch(kernel_name: str, num_regions: int, num_points: int, channels: int, side: int):
    """(grid, constexprs + num_warps). Regions go on grid axis 0 (2^31 - 1 blocks; axes 1-2 allow 65535)."""
    if max(side * side, num_points) * channels >= 2**31:
        raise ValueError(f"a map ({side}x{side}x{channels}) or a region's points ({num_points}x{channels}) exceed int32 offsets")
    max_p, max_c = _TILES[kernel_name]
    config = blocks(kernel_name, BLOCK_P=min(max_p, next_power_of_2(num_points)), BLOCK_C=min(max_c, next_power_of_2(channels)), num_warps=4)
    grid = (num_regions, triton.cdiv(num_points, config["BLOCK_P"]), triton.cdiv(channels, config["BLOCK_C"]))
    return grid, config


class _PointFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feature_maps, points, image_index, side: int, official: bool):
        num_regions, num_points, _ = points.shape
        channels = feature_maps.shape[-1]
        out = torch.empty(num_regions, num_points, channels, dtype=feature_maps.dtype, device=feature_maps.device)
        grid, config = _launch("point_features_fwd", num_regions, num_points, channels, side)
        if num_regions and num_points:
            with device_guard(feature_maps):
                _point_features_fwd[grid](
                    feature_maps, points, image_index, out, num_points, channels, side, OFFICIAL=official, **config
                )
        ctx.save_for_backward(points, image_index)
        ctx.meta = (feature_maps.shape, feature_maps.dtype, side, official)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        points, image_index = ctx.saved_tensors
        maps_shape, maps_dtype, side, official = ctx.meta
        num_regions, num_points, _ = points.shape
        channels = maps_shape[-1]
        if deterministic():
            cells, weights = folded.bilinear_corners(points, side, "official" if official else "aligned", torch.float32)
            cells = cells + (image_index * side * side).view(1, -1, 1)
            grad_rows = folded.scatter_corners(grad_out.float().reshape(-1, channels), cells, weights, maps_shape[0] * side * side)
            return grad_rows.view(maps_shape).to(maps_dtype), None, None, None, None
        grad_maps = torch.zeros(maps_shape, dtype=torch.float32, device=grad_out.device)
        grid, config = _launch("point_features_bwd", num_regions, num_points, channels, side)
        if num_regions and num_points:
            with device_guard(grad_maps):
                _point_features_bwd[grid](
                    grad_out.contiguous(), points, image_index, grad_maps, num_points, channels, side,
                    OFFICIAL=official, **config,
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
    if layout not in FEATURE_LAYOUTS:
        raise ValueError(f"layout must be one of {FEATURE_LAYOUTS}, got {layout!r}")
    side = reference._grid_side(feature_maps)
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, N, 2], got shape {tuple(points.shape)}")
    reference._check_image_index(image_index, points.shape[0], feature_maps.shape[0])
    check_device(feature_maps, points, image_index)
    return _PointFeatures.apply(
        feature_maps.contiguous(), points.detach().float().contiguous(), image_index.to(torch.int64).contiguous(),
        side, layout == "official",
    )
