"""The region sampler's pipeline folded by exact algebra, shared by two backends of `ops`.

Run with this module's PyTorch building blocks (`FAST_KERNELS`) it is the "fast" backend, the CPU
route; the Triton backend (`triton_sampler`) runs the same pipeline with its kernels swapped in
(`SamplerKernels`). The masks -> points steps the Triton mask kernels share are here too.

Same math as `reference`, rearranged by exact algebra so that the heavy work is a few matmuls on
contiguous blocks and nothing of width 2(D+2) per neighbour is ever built.

Folding one stage. With x = [feature, xy] (width d = D+2), the released chain per neighbour j of
anchor a is  h = W_a (D (x_j - x_a) + d_b) + W_b x_a + c  (conv weight = [W_a | W_b], diff Linear
= (D, d_b)), i.e.  h = U_j - U_a + W_b x_a + bias'  with  U = W_a D x  per point and
bias' = W_a d_b + c.  U is either computed as (x D^T) W_a^T (two per-point matmuls) or with the
folded weight A = W_a D (one [D, d] x [d, d] weight product, then one per-point matmul): we pick
whichever costs fewer FLOPs for the batch at hand. U_a is a row of U (anchors are points), so the
per-anchor term V = W_b x_a - U_a + bias' costs one small matmul.

Then `group_pool` does gather -> add -> ReLU -> LayerNorm -> max/mean over the k neighbours in
cache-sized chunks of anchors with fp32 statistics; its backward keeps only the LayerNorm mean/rstd
and the pooled output, and recomputes the rest chunk by chunk.

From the maps (`geo_region_sampler_from_maps`): bilinear sampling is linear, so stage 1's per-point
projection is computed once per image on the S x S map (G = map A_F^T) and then sampled at the
points: B*S*S rows of matmul instead of R*N, and the [R, N, D] point features are only sampled at
the anchors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import reference
from .params import FEATURE_LAYOUTS, POOLER_MODES, SamplerGeometry, SamplerParams, StageParams

__all__ = [
    "pack_masks",
    "pick_mask_pixels",
    "finish_points_torch",
    "sample_mask_points",
    "mask_average_pool",
    "fold_stage_weights",
    "point_projection",
    "anchor_projection",
    "group_pool",
    "farthest_point_sample",
    "knn_indices",
    "bilinear_corners",
    "sample_maps",
    "scatter_corners",
    "sampler_stage",
    "geo_region_sampler",
    "geo_region_sampler_from_maps",
    "SamplerKernels",
    "FAST_KERNELS",
]

# Bytes of one fp32 [anchors, k, D] working chunk: small enough to stay in a core's L2/L3.
_CHUNK_BYTES = 1 << 21


# --------------------------------------------------------------------------- geometry


def farthest_point_sample(
    xy: torch.Tensor,
    num_samples: int,
    start_index: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Same contract as `reference.farthest_point_sample`, with a leaner loop body.

    Per step: one gather of the current anchor's coordinates, one fused distance update, one argmax
    (first maximum -> lowest index on ties, as the reference).
    """
    if xy.dim() != 3:
        raise ValueError(f"xy must be [R, N, D], got shape {tuple(xy.shape)}")
    num_regions, num_points, _ = xy.shape
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"num_samples must be in [1, {num_points}], got {num_samples}")
    coords = xy.detach().float().contiguous()
    current = reference._start_index(start_index, num_regions, num_points, xy.device, generator)
    chosen = torch.empty(num_regions, num_samples, dtype=torch.long, device=xy.device)
    nearest = torch.full((num_regions, num_points), float("inf"), device=xy.device)
    flat = coords.view(-1, coords.shape[-1])
    offsets = torch.arange(num_regions, device=xy.device) * num_points
    for step in range(num_samples):
        chosen[:, step] = current
        anchor = flat.index_select(0, current + offsets).unsqueeze(1)  # [R, 1, 2]
        torch.minimum(nearest, (coords - anchor).square_().sum(-1), out=nearest)
        current = nearest.argmax(dim=-1)
    return chosen


def knn_indices(query: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's kNN: already one batched matmul + topk. Re-implementing it would risk the
    released neighbour set, which depends on the rounding of the |q|^2+|r|^2-2q.r expansion."""
    return reference.knn_indices(query, ref, k)


# --------------------------------------------------------------------------- masks -> points
# Design notes in `mask_points` (the Triton version of the last step).


def pack_masks(masks) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (W, H) masks or an [R, W, H] tensor -> (bool [R, Wmax, Hmax], long sizes [R, 2])."""
    mask_list = reference._as_mask_list(masks)
    if not mask_list:
        raise ValueError("no masks given")
    device = mask_list[0].device
    # Sizes are written with fills, not torch.tensor(list, device=...): a host->device copy
    # from pageable memory would synchronise.
    sizes = torch.empty(len(mask_list), 2, dtype=torch.long, device=device)
    if isinstance(masks, torch.Tensor):
        packed = masks if masks.dtype == torch.bool else masks != 0
        sizes[:, 0], sizes[:, 1] = masks.shape[1], masks.shape[2]
        return packed.contiguous(), sizes
    width = max(m.shape[0] for m in mask_list)
    height = max(m.shape[1] for m in mask_list)
    packed = torch.zeros(len(mask_list), width, height, dtype=torch.bool, device=device)
    for region, mask in enumerate(mask_list):
        packed[region, : mask.shape[0], : mask.shape[1]] = mask
        sizes[region, 0], sizes[region, 1] = mask.shape
    return packed, sizes


def pick_mask_pixels(
    packed: torch.Tensor, num_points: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-2 -> (picked flat pixel indices [R, min(N, W*H)], pixel counts [R], uniforms [R, N]).

    A mask with P >= N pixels yields N distinct pixels in random order (descending key); one with
    P < N yields its P pixels in raster (= nonzero()) order, then non-mask padding.
    """
    num_regions = packed.shape[0]
    flat = packed.view(num_regions, -1)
    counts = flat.sum(dim=1)
    if flat.device.type == "cpu":
        empty = (counts == 0).nonzero()
        if empty.numel():
            raise ValueError(f"region {int(empty[0, 0])}: mask is empty (no pixel set)")
    else:  # a host-side check would synchronise: assert on the device instead
        torch._assert_async((counts > 0).all(), "sample_mask_points: a region mask is empty (no pixel set)")
    draw_device = generator.device if generator is not None else flat.device
    keys = torch.rand(flat.shape, generator=generator, device=draw_device).to(flat.device)
    keys = torch.where(flat, keys, -1.0)
    by_key = keys.topk(min(num_points, flat.shape[1]), dim=1, sorted=True).indices
    # Raster order with the non-mask picks (key -1, only when P < N) last.
    raster = torch.where(flat.gather(1, by_key), by_key, flat.shape[1] + by_key).sort(dim=1).values
    picked = torch.where((counts >= num_points).unsqueeze(1), by_key, raster)
    uniform = torch.rand(num_regions, num_points, generator=generator, device=draw_device).to(flat.device)
    return picked, counts, uniform


def finish_points_torch(picked, counts, uniform, sizes, padded_height: int) -> torch.Tensor:
    """Step 3 in torch (the fast CPU backend): same arithmetic as the Triton kernel."""
    num_points = uniform.shape[1]
    slots = torch.arange(num_points, device=picked.device)
    drawn = torch.minimum((uniform * counts[:, None].float()).long(), counts[:, None] - 1)
    rank = torch.where(slots < counts[:, None], slots, drawn)
    pixel = picked.gather(1, rank.clamp(max=picked.shape[1] - 1))
    xy = torch.stack([pixel // padded_height, pixel % padded_height], dim=-1).float()
    return xy / sizes[:, None, :].float()


def sample_mask_points(masks, num_points: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Same contract as `reference.sample_mask_points` (same distribution; the draws differ) with no
    host synchronisation on CUDA: random keys + top-k, then ranks for the with-replacement slots."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    packed, sizes = pack_masks(masks)
    picked, counts, uniform = pick_mask_pixels(packed, num_points, generator)
    return finish_points_torch(picked, counts, uniform, sizes, packed.shape[2])


def mask_average_pool(
    feature_maps: torch.Tensor,
    masks,
    image_index: torch.Tensor,
    num_points: int | None = 512,
    layout: str = "official",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Same contract as `reference.mask_average_pool`, with the pixel choice of `sample_mask_points`
    (min(N, P) distinct pixels) and one batched bilinear sample."""
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be >= 1 or None, got {num_points}")
    packed, sizes = pack_masks(masks)
    packed, sizes = packed.to(feature_maps.device), sizes.to(feature_maps.device)
    limit = packed.shape[1] * packed.shape[2] if num_points is None else num_points
    picked, counts, uniform = pick_mask_pixels(packed, limit, generator)
    take = counts.clamp(max=picked.shape[1])
    points = finish_points_torch(picked, counts, uniform[:, : picked.shape[1]], sizes, packed.shape[2])
    sampled = reference.point_features(feature_maps, points, image_index, layout)
    valid = torch.arange(picked.shape[1], device=feature_maps.device) < take[:, None]
    summed = (sampled.float() * valid.unsqueeze(-1)).sum(dim=1)
    return (summed / take[:, None]).to(feature_maps.dtype)


# --------------------------------------------------------------------------- folded projections


def fold_stage_weights(stage: StageParams, num_points_total: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split/fold one stage's weights -> (folded A = W_a D or None, W_a, W_b, bias').

    A is built only when its one-off cost (D x d x d) is below the per-point cost it saves
    (num_points_total x d x d); otherwise U is computed as (x D^T) W_a^T.
    """
    conv = stage.conv_matrix
    width = conv.shape[0]
    d = width + 2
    w_a, w_b = conv[:, :d], conv[:, d:]
    bias = torch.addmv(stage.conv_bias, w_a, stage.diff_bias)
    folded = w_a @ stage.diff_weight if num_points_total > width else None
    return folded, w_a, w_b, bias


def _linear_split(features: torch.Tensor, xy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[feature, xy] @ weight^T without concatenating: features [.., D] and xy [.., 2]."""
    width = features.shape[-1]
    lead = features.shape[:-1]
    flat = torch.addmm(
        torch.mm(features.reshape(-1, width), weight[:, :width].t()), xy.reshape(-1, 2), weight[:, width:].t()
    )
    return flat.view(*lead, weight.shape[0])


def point_projection(features: torch.Tensor, xy: torch.Tensor, stage: StageParams, folded: torch.Tensor | None, w_a: torch.Tensor) -> torch.Tensor:
    """U = W_a D [feature, xy] per point -> [R, N, D]."""
    if folded is not None:
        return _linear_split(features, xy, folded)
    return torch.matmul(_linear_split(features, xy, stage.diff_weight), w_a.t())


def anchor_projection(
    anchor_features: torch.Tensor, anchor_xy: torch.Tensor, anchor_u: torch.Tensor, w_b: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """V = W_b [feature, xy]_a - U_a + bias' per anchor -> [R, M, D]."""
    return _linear_split(anchor_features, anchor_xy, w_b) - anchor_u + bias


# --------------------------------------------------------------------------- fused group pool


def _chunk_rows(k: int, width: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * k * width))


def _gather_hidden(u_flat: torch.Tensor, v_flat: torch.Tensor, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """ReLU(U[neighbour] + V[anchor]) for anchors [start, stop) -> fp32 [n, k, D]."""
    n, k = stop - start, rows.shape[1]
    hidden = u_flat.index_select(0, rows[start:stop].reshape(-1)).view(n, k, -1)
    return hidden.add_(v_flat[start:stop].unsqueeze(1)).relu_()


class _GroupPool(torch.autograd.Function):
    """Chunked gather -> add -> ReLU -> LayerNorm -> pool; saves only LN mean/rstd and the output.

    Max pooling routes the gradient like `amax` (the reference): split evenly between neighbours
    that tie for the maximum; the backward finds them by recomputing the normalised rows.
    """

    @staticmethod
    def forward(ctx, point_u, anchor_v, neighbour_index, ln_weight, ln_bias, eps: float, pool: str):
        num_regions, num_points, width = point_u.shape
        num_anchors, k = neighbour_index.shape[1:]
        offsets = torch.arange(num_regions, device=point_u.device).view(-1, 1, 1) * num_points
        rows = (neighbour_index + offsets).view(-1, k)
        # Statistics in fp32 at least (bf16/fp16 inputs); fp64 stays fp64.
        dtype = torch.promote_types(point_u.dtype, torch.float32)
        u_flat = point_u.reshape(-1, width).to(dtype)
        v_flat = anchor_v.reshape(-1, width).to(dtype)
        gamma, beta = ln_weight.to(dtype), ln_bias.to(dtype)
        total = rows.shape[0]
        out = torch.empty(total, width, device=point_u.device, dtype=dtype)
        mean = torch.empty(total, k, 1, device=point_u.device, dtype=dtype)
        rstd = torch.empty(total, k, 1, device=point_u.device, dtype=dtype)
        step = _chunk_rows(k, width)
        for start in range(0, total, step):
            stop = min(total, start + step)
            hidden = _gather_hidden(u_flat, v_flat, rows, start, stop)
            normed, mean[start:stop], rstd[start:stop] = torch.native_layer_norm(hidden, [width], gamma, beta, eps)
            reduce = torch.amax if pool == "max" else torch.mean
            reduce(normed, dim=1, out=out[start:stop])
        ctx.save_for_backward(u_flat, v_flat, rows, gamma, beta, mean, rstd, out if pool == "max" else None)
        ctx.meta = (pool, eps, point_u.shape, anchor_v.shape, point_u.dtype, anchor_v.dtype, ln_weight.dtype)
        return out.view(num_regions, num_anchors, width).to(point_u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        u_flat, v_flat, rows, gamma, beta, mean, rstd, out = ctx.saved_tensors
        pool, eps, u_shape, v_shape, u_dtype, v_dtype, w_dtype = ctx.meta
        width, k = u_flat.shape[1], rows.shape[1]
        grad_out = grad_out.reshape(-1, width).to(u_flat.dtype)
        grad_u = torch.zeros_like(u_flat)
        grad_v = torch.empty_like(v_flat)
        grad_gamma = torch.zeros_like(gamma)
        grad_beta = torch.zeros_like(beta)
        mask = [True, ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        step = _chunk_rows(k, width)
        for start in range(0, rows.shape[0], step):
            stop = min(rows.shape[0], start + step)
            hidden = _gather_hidden(u_flat, v_flat, rows, start, stop)
            chunk_grad = grad_out[start:stop].unsqueeze(1)
            if pool == "max":
                normed = torch.native_layer_norm(hidden, [width], gamma, beta, eps)[0]
                # Winner mask as floats in place (several times faster than bool masks + where).
                grad_normed = torch.eq(normed, out[start:stop].unsqueeze(1), out=normed)
                grad_normed.mul_(chunk_grad / grad_normed.sum(dim=1, keepdim=True))
            else:
                grad_normed = (chunk_grad / k).expand_as(hidden).contiguous()
            grad_hidden, g_gamma, g_beta = torch.ops.aten.native_layer_norm_backward(
                grad_normed, hidden, [width], mean[start:stop], rstd[start:stop], gamma, beta, mask
            )
            grad_hidden = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0.0)  # ReLU
            torch.sum(grad_hidden, dim=1, out=grad_v[start:stop])
            grad_u.index_add_(0, rows[start:stop].reshape(-1), grad_hidden.view(-1, width))
            if g_gamma is not None:
                grad_gamma += g_gamma
            if g_beta is not None:
                grad_beta += g_beta
        return (
            grad_u.view(u_shape).to(u_dtype),
            grad_v.view(v_shape).to(v_dtype),
            None,
            grad_gamma.to(w_dtype) if mask[1] else None,
            grad_beta.to(w_dtype) if mask[2] else None,
            None,
            None,
        )


def group_pool(
    point_u: torch.Tensor,
    anchor_v: torch.Tensor,
    neighbour_index: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    pool: str = "max",
) -> torch.Tensor:
    """pool_j LayerNorm(ReLU(U[r, idx[r, a, j]] + V[r, a])) -> [R, M, D] (pool over the k neighbours).

    point_u [R, N, D], anchor_v [R, M, D], neighbour_index [R, M, k]. Statistics in fp32; the result
    has point_u's dtype. Differentiable in U, V and the LayerNorm affine weights.
    """
    if pool not in POOLER_MODES:
        raise ValueError(f"pool must be one of {POOLER_MODES}, got {pool!r}")
    return _GroupPool.apply(point_u, anchor_v, neighbour_index, ln_weight, ln_bias, float(eps), pool)


# --------------------------------------------------------------------------- bilinear sampling


def bilinear_corners(points: torch.Tensor, side: int, layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells [4, R, N] (row-major in one S x S map) and weights [4, R, N] of the four bilinear
    corners, in grid_sample's arithmetic (align_corners=True, zero padding: outside corners get
    weight 0 and a clamped cell)."""
    p = points.detach().to(dtype)
    gx, gy = (p[..., 1], p[..., 0]) if layout == "official" else (p[..., 0], p[..., 1])
    ix = ((2.0 * gx - 1.0) + 1.0) / 2.0 * (side - 1)
    iy = ((2.0 * gy - 1.0) + 1.0) / 2.0 * (side - 1)
    x0, y0 = ix.floor(), iy.floor()
    x1, y1 = x0 + 1, y0 + 1
    weights = torch.stack([(x1 - ix) * (y1 - iy), (ix - x0) * (y1 - iy), (x1 - ix) * (iy - y0), (ix - x0) * (iy - y0)])
    xs, ys = torch.stack([x0, x1, x0, x1]), torch.stack([y0, y0, y1, y1])
    inside = (xs >= 0) & (xs <= side - 1) & (ys >= 0) & (ys <= side - 1)
    cells = ys.clamp(0, side - 1).long() * side + xs.clamp(0, side - 1).long()
    return cells, weights * inside


class _BilinearRows(torch.autograd.Function):
    """Bilinear samples of channels-last maps by four row gathers (no transposes); gradient to the
    maps by four index_add_ scatters. Both walk the points in cache-sized chunks so the four
    partial sums of a chunk stay in cache."""

    @staticmethod
    def forward(ctx, map_rows, cells, weights):
        channels = map_rows.shape[1]
        flat_cells, flat_weights = cells.reshape(4, -1), weights.reshape(4, -1, 1)
        total = flat_cells.shape[1]
        out = map_rows.new_empty(total, channels)
        step = max(1, _CHUNK_BYTES // (4 * channels))
        for start in range(0, total, step):
            stop = min(total, start + step)
            chunk = out[start:stop]
            torch.mul(map_rows.index_select(0, flat_cells[0, start:stop]), flat_weights[0, start:stop], out=chunk)
            for corner in range(1, 4):
                rows = map_rows.index_select(0, flat_cells[corner, start:stop])
                chunk.add_(rows.mul_(flat_weights[corner, start:stop]))
        ctx.save_for_backward(cells, weights)
        ctx.num_rows = map_rows.shape[0]
        return out.view(*cells.shape[1:], channels)

    @staticmethod
    def backward(ctx, grad_out):
        cells, weights = ctx.saved_tensors
        return scatter_corners(grad_out.reshape(-1, grad_out.shape[-1]), cells, weights, ctx.num_rows), None, None


def scatter_corners(grad_points: torch.Tensor, cells: torch.Tensor, weights: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Gradient of bilinear sampling wrt the map rows: grad_points [P, C] scattered to the four
    corners (`bilinear_corners` cells/weights [4, ...] over the same P points) -> [num_rows, C].
    index_add_ is deterministic on CUDA under torch.use_deterministic_algorithms(True), which is
    why the Triton backward comes here in that mode."""
    channels = grad_points.shape[1]
    grad_rows = grad_points.new_zeros(num_rows, channels)
    flat_cells, flat_weights = cells.reshape(4, -1), weights.reshape(4, -1, 1)
    step = max(1, _CHUNK_BYTES // (4 * channels))
    for start in range(0, grad_points.shape[0], step):
        stop = min(grad_points.shape[0], start + step)
        for corner in range(4):
            grad_rows.index_add_(0, flat_cells[corner, start:stop], grad_points[start:stop] * flat_weights[corner, start:stop])
    return grad_rows


def sample_maps(feature_maps: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor, layout: str = "official") -> torch.Tensor:
    """`reference.point_features` without copying one map per region and without channel-first
    transposes: four row gathers from the channels-last maps, with grid_sample's corner weights
    (equal to the reference within fp32 rounding), in cache-sized chunks; its scatter backward
    is ~2.5x faster than grid_sample's. When the points need a gradient (not given here), the
    reference (grid_sample) is used instead."""
    if points.requires_grad:
        return reference.point_features(feature_maps, points, image_index, layout)
    if layout not in FEATURE_LAYOUTS:
        raise ValueError(f"layout must be one of {FEATURE_LAYOUTS}, got {layout!r}")
    side = reference._grid_side(feature_maps)
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, N, 2], got shape {tuple(points.shape)}")
    reference._check_image_index(image_index, points.shape[0], feature_maps.shape[0])
    compute_dtype = torch.promote_types(feature_maps.dtype, torch.float32)
    cells, weights = bilinear_corners(points, side, layout, compute_dtype)
    cells = cells + (image_index * side * side).view(1, -1, 1)
    map_rows = feature_maps.reshape(-1, feature_maps.shape[-1]).to(compute_dtype)
    return _BilinearRows.apply(map_rows, cells, weights).to(feature_maps.dtype)


# --------------------------------------------------------------------------- sampler


def sampler_stage(
    xy: torch.Tensor,
    features: torch.Tensor,
    stage_params: StageParams,
    num_sub_point: int,
    num_neighbor: int,
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    kernels: "SamplerKernels | None" = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.sampler_stage`, computed with the folded projections.
    `kernels` swaps FPS, kNN and the group pool (the Triton backend passes its own)."""
    kernels = kernels or FAST_KERNELS
    anchor_index = kernels.fps(xy, num_sub_point, fps_start, generator)
    anchor_xy = reference.gather_points(xy, anchor_index)
    neighbour_index = kernels.knn(anchor_xy, xy, num_neighbor)
    folded, w_a, w_b, bias = fold_stage_weights(stage_params, xy.shape[0] * xy.shape[1])
    point_xy = xy.to(features.dtype)
    point_u = point_projection(features, point_xy, stage_params, folded, w_a)
    anchor_v = anchor_projection(
        reference.gather_points(features, anchor_index),
        anchor_xy.to(features.dtype),
        reference.gather_points(point_u, anchor_index),
        w_b,
        bias,
    )
    pooled = kernels.group_pool(
        point_u, anchor_v, neighbour_index, stage_params.ln_weight, stage_params.ln_bias, stage_params.ln_eps, pool
    )
    return anchor_xy, pooled


def geo_region_sampler(
    points: torch.Tensor,
    features: torch.Tensor,
    params: SamplerParams,
    geometry: SamplerGeometry = SamplerGeometry(),
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    stage_fn=None,
) -> torch.Tensor:
    """Same contract as `reference.geo_region_sampler`. `stage_fn` swaps the per-stage
    implementation (the Triton backend passes its own); default: the fast `sampler_stage`."""
    reference.check_sampler_inputs(points, features, params, geometry)
    stage_fn = stage_fn or sampler_stage
    xy, hidden = points, features
    for stage, stage_params in enumerate(params.stages):
        xy, hidden = stage_fn(xy, hidden, stage_params, geometry.num_sub_point[stage], geometry.num_neighbor[stage], pool, fps_start, generator)
    flat = hidden.flatten(1)
    return F.linear(F.linear(flat, params.flatten_weight, params.flatten_bias), params.dim_weight, params.dim_bias)


def geo_region_sampler_from_maps(
    feature_maps: torch.Tensor,
    points: torch.Tensor,
    image_index: torch.Tensor,
    params: SamplerParams,
    geometry: SamplerGeometry = SamplerGeometry(),
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    layout: str = "official",
    kernels: SamplerKernels | None = None,
) -> torch.Tensor:
    """`geo_region_sampler(points, point_features(feature_maps, points, image_index, layout), ...)`
    with stage 1's per-point projection computed on the maps (see the module notes). `kernels`
    swaps the building blocks (the Triton backend passes its own); default: this module's."""
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, N, 2], got shape {tuple(points.shape)}")
    reference._grid_side(feature_maps)
    if feature_maps.shape[-1] != params.input_dim:
        raise ValueError(f"feature maps have width {feature_maps.shape[-1]}, the weights expect {params.input_dim}")
    # Validation only reads shapes: a zero-stride view stands in for the [R, N, C] features.
    feature_shape = points.new_empty(()).expand(*points.shape[:2], params.input_dim)
    reference.check_sampler_inputs(points, feature_shape, params, geometry)
    width = params.input_dim
    stage = params.stages[0]
    dtype = feature_maps.dtype
    kernels = kernels or FAST_KERNELS
    anchor_index = kernels.fps(points, geometry.num_sub_point[0], fps_start, generator)
    anchor_xy = reference.gather_points(points, anchor_index)
    neighbour_index = kernels.knn(anchor_xy, points, geometry.num_neighbor[0])

    map_rows = feature_maps.reshape(-1, width)  # [B*S*S, D]
    conv = stage.conv_matrix
    w_a, w_b = conv[:, : width + 2], conv[:, width + 2 :]
    bias = torch.addmv(stage.conv_bias, w_a, stage.diff_bias)
    diff_f, diff_p = stage.diff_weight[:, :width], stage.diff_weight[:, width:]
    if map_rows.shape[0] > width:  # fold: one [D, d] x [d, D] weight product beats a second map matmul
        map_u = map_rows @ (w_a @ diff_f).t()
    else:
        map_u = (map_rows @ diff_f.t()) @ w_a.t()
    point_xy = points.to(dtype)
    point_u = kernels.sample(map_u.view_as(feature_maps), points, image_index, layout)
    point_u = torch.baddbmm(point_u, point_xy, (w_a @ diff_p).t().expand(points.shape[0], 2, width))
    anchor_features = kernels.sample(feature_maps, anchor_xy, image_index, layout)
    anchor_v = anchor_projection(
        anchor_features, anchor_xy.to(dtype), reference.gather_points(point_u, anchor_index), w_b, bias
    )
    hidden = kernels.group_pool(point_u, anchor_v, neighbour_index, stage.ln_weight, stage.ln_bias, stage.ln_eps, pool)
    xy = anchor_xy
    for index in range(1, len(params.stages)):
        xy, hidden = kernels.stage(
            xy, hidden, params.stages[index], geometry.num_sub_point[index], geometry.num_neighbor[index], pool, fps_start, generator
        )
    flat = hidden.flatten(1)
    return F.linear(F.linear(flat, params.flatten_weight, params.flatten_bias), params.dim_weight, params.dim_bias)


class SamplerKernels(NamedTuple):
    """The building blocks `geo_region_sampler_from_maps` is assembled from."""

    fps: Callable
    knn: Callable
    sample: Callable
    group_pool: Callable
    stage: Callable


FAST_KERNELS = SamplerKernels(farthest_point_sample, knn_indices, sample_maps, group_pool, sampler_stage)
