"""Fused group pool of one folded sampler stage, as Triton kernels.

With U [R, N, D] the per-point projection and V [R, M, D] the per-anchor one (see `folded`), the
stage output is  pool_j LayerNorm(ReLU(U[idx[r, a, j]] + V[r, a]))  over the k neighbours j.

Forward: one program per anchor. Pass 1 walks the channels in blocks and merges each block's
mean and centred sum of squares into the row's (Chan/Welford: no E[x^2] - mean^2 cancellation);
pass 2 recomputes the rows, normalises and pools. It stores the pooled output, the per-row mean /
rstd ([R, M, k]) and, for max pooling, the winners: a bit mask over the k neighbours per output
value ([R, M, D] int32, int64 when k > 32), so the backward never re-derives them by comparing
floats computed by another kernel. Ties split the gradient evenly, as the reference's `amax`.
Backward: a fixed number of persistent programs walk the anchors; per anchor pass 1 the two
LayerNorm reductions, pass 2 the row gradient, written to dV and added to dU with relaxed atomics.
The LayerNorm weight gradients are summed per program in-kernel ([programs, D], not [R*M, D]).
Under torch.use_deterministic_algorithms(True) the row gradients go, chunk of anchors by chunk, to
a buffer that torch's index_add_ (deterministic on CUDA in that mode) adds into dU.
Nothing of size [R, M, k, D] is ever materialised outside that mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import folded
from ._triton import blocks, check_device, deterministic, device_guard, next_power_of_2, num_programs_cap
from .params import POOLER_MODES

__all__ = ["group_pool"]

MAX_WINNER_BITS = 64  # max pooling over more neighbours than this goes to `folded.group_pool`
_DETERMINISTIC_CHUNK = 1 << 26  # fp32 values of one row-gradient buffer in deterministic mode


@triton.jit
def _load_rows(u_base, v_row, rows, k_valid, channels, c_offsets, c_valid):
    """ReLU(U[rows] + V[anchor]) for one channel block -> fp32 [BLOCK_K, BLOCK_C] (0 where invalid).
    `u_base` is the region's U (int64 base), `rows` int32 point indices: int32 tile offsets."""
    both = k_valid[:, None] & c_valid[None, :]
    u = tl.load(u_base + rows[:, None] * channels + c_offsets[None, :], mask=both, other=0.0).to(tl.float32)
    v = tl.load(v_row + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
    return tl.where(both, tl.maximum(u + v[None, :], 0.0), 0.0)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _group_pool_fwd(
    u_ptr, v_ptr, index_ptr, gamma_ptr, beta_ptr, out_ptr, mean_ptr, rstd_ptr, winners_ptr,
    num_points, num_anchors, channels, k, eps,
    MAX_POOL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    anchor = tl.program_id(0).to(tl.int64)  # flat over R * M
    region = anchor // num_anchors
    k_offsets = tl.arange(0, BLOCK_K)
    k_valid = k_offsets < k
    rows = tl.load(index_ptr + anchor * k + k_offsets, mask=k_valid, other=0).to(tl.int32)
    u_base = u_ptr + region * num_points * channels
    v_row = v_ptr + anchor * channels
    mean = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c_offsets = c0 + tl.arange(0, BLOCK_C)
        c_valid = c_offsets < channels
        hidden = _load_rows(u_base, v_row, rows, k_valid, channels, c_offsets, c_valid)
        seen = tl.zeros([BLOCK_K], dtype=tl.float32) + c0
        n_block = tl.zeros([BLOCK_K], dtype=tl.float32) + tl.sum(c_valid.to(tl.float32), axis=0)
        block_mean = tl.math.div_rn(tl.sum(hidden, axis=1), n_block)
        centred = tl.where(c_valid[None, :], hidden - block_mean[:, None], 0.0)
        total = seen + n_block
        delta = block_mean - mean
        mean = mean + delta * tl.math.div_rn(n_block, total)
        m2 = m2 + tl.sum(centred * centred, axis=1) + delta * delta * tl.math.div_rn(seen * n_block, total)
    variance = tl.math.div_rn(m2, tl.zeros([BLOCK_K], dtype=tl.float32) + channels)
    rstd = tl.math.div_rn(tl.full([BLOCK_K], 1.0, tl.float32), tl.sqrt_rn(variance + eps))
    tl.store(mean_ptr + anchor * k + k_offsets, mean, mask=k_valid)
    tl.store(rstd_ptr + anchor * k + k_offsets, rstd, mask=k_valid)
    for c0 in range(0, channels, BLOCK_C):
        c_offsets = c0 + tl.arange(0, BLOCK_C)
        c_valid = c_offsets < channels
        hidden = _load_rows(u_base, v_row, rows, k_valid, channels, c_offsets, c_valid)
        gamma = tl.load(gamma_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        normed = (hidden - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        if MAX_POOL:
            normed = tl.where(k_valid[:, None], normed, float("-inf"))
            pooled = tl.max(normed, axis=0)
            bit = tl.full([BLOCK_K], 1, winners_ptr.dtype.element_ty) << k_offsets.to(winners_ptr.dtype.element_ty)
            bits = tl.where(normed == pooled[None, :], bit[:, None], 0)
            tl.store(winners_ptr + anchor * channels + c_offsets, tl.reduce(bits, 0, _bit_or), mask=c_valid)
        else:
            pooled = tl.math.div_rn(tl.sum(tl.where(k_valid[:, None], normed, 0.0), axis=0), tl.zeros([BLOCK_C], dtype=tl.float32) + k)
        tl.store(out_ptr + anchor * channels + c_offsets, pooled, mask=c_valid)


@triton.jit
def _pooled_grad_rows(winners_ptr, grad, anchor, channels, c_offsets, c_valid, k_offsets, k_valid, k, MAX_POOL: tl.constexpr):
    """d pooled / d normed rows for one channel block: to the saved winners (split evenly), or 1/k."""
    if MAX_POOL:
        bits = tl.load(winners_ptr + anchor * channels + c_offsets, mask=c_valid, other=0)
        winners = ((bits[None, :] >> k_offsets[:, None].to(bits.dtype)) & 1) != 0
        count = tl.maximum(tl.sum(winners.to(tl.float32), axis=0), 1.0)
        return tl.where(winners, tl.math.div_rn(grad, count)[None, :], 0.0)
    else:
        share = tl.math.div_rn(grad, tl.zeros([grad.shape[0]], dtype=tl.float32) + k)
        return tl.where(k_valid[:, None], share[None, :], 0.0)


@triton.jit
def _group_pool_bwd(
    u_ptr, v_ptr, index_ptr, gamma_ptr, mean_ptr, rstd_ptr, winners_ptr, grad_out_ptr,
    grad_u_ptr, grad_v_ptr, partial_gamma_ptr, partial_beta_ptr, grad_rows_ptr,
    num_points, num_anchors, channels, k, anchor_start, anchor_stop,
    MAX_POOL: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    program = tl.program_id(0)
    k_offsets = tl.arange(0, BLOCK_K)
    k_valid = k_offsets < k
    # This program's row of the LayerNorm weight-gradient partials (its anchors, in a fixed order).
    partial_gamma = partial_gamma_ptr + program * channels
    partial_beta = partial_beta_ptr + program * channels
    for flat in range(anchor_start + program, anchor_stop, tl.num_programs(0)):
        anchor = tl.cast(flat, tl.int64)
        region = anchor // num_anchors
        rows = tl.load(index_ptr + anchor * k + k_offsets, mask=k_valid, other=0).to(tl.int32)
        u_base = u_ptr + region * num_points * channels
        v_row = v_ptr + anchor * channels
        mean = tl.load(mean_ptr + anchor * k + k_offsets, mask=k_valid, other=0.0)
        rstd = tl.load(rstd_ptr + anchor * k + k_offsets, mask=k_valid, other=0.0)
        # Pass 1: the LayerNorm backward reductions sum_c(g*dy) and sum_c(g*dy*xhat) per row.
        dot_g = tl.zeros([BLOCK_K], dtype=tl.float32)
        dot_gx = tl.zeros([BLOCK_K], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c_offsets = c0 + tl.arange(0, BLOCK_C)
            c_valid = c_offsets < channels
            hidden = _load_rows(u_base, v_row, rows, k_valid, channels, c_offsets, c_valid)
            gamma = tl.load(gamma_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
            grad = tl.load(grad_out_ptr + anchor * channels + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
            grad_rows = _pooled_grad_rows(winners_ptr, grad, anchor, channels, c_offsets, c_valid, k_offsets, k_valid, k, MAX_POOL)
            xhat = (hidden - mean[:, None]) * rstd[:, None]
            scaled = grad_rows * gamma[None, :]
            dot_g += tl.sum(scaled, axis=1)
            dot_gx += tl.sum(scaled * xhat, axis=1)
        dot_g = tl.math.div_rn(dot_g, tl.zeros([BLOCK_K], dtype=tl.float32) + channels)
        dot_gx = tl.math.div_rn(dot_gx, tl.zeros([BLOCK_K], dtype=tl.float32) + channels)
        # Pass 2: d hidden = rstd (g dy - mean(g dy) - xhat mean(g dy xhat)), through the ReLU.
        for c0 in range(0, channels, BLOCK_C):
            c_offsets = c0 + tl.arange(0, BLOCK_C)
            c_valid = c_offsets < channels
            both = k_valid[:, None] & c_valid[None, :]
            hidden = _load_rows(u_base, v_row, rows, k_valid, channels, c_offsets, c_valid)
            gamma = tl.load(gamma_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
            grad = tl.load(grad_out_ptr + anchor * channels + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
            grad_rows = _pooled_grad_rows(winners_ptr, grad, anchor, channels, c_offsets, c_valid, k_offsets, k_valid, k, MAX_POOL)
            xhat = (hidden - mean[:, None]) * rstd[:, None]
            grad_hidden = rstd[:, None] * (grad_rows * gamma[None, :] - dot_g[:, None] - xhat * dot_gx[:, None])
            grad_hidden = tl.where(both & (hidden > 0.0), grad_hidden, 0.0)
            tl.store(grad_v_ptr + anchor * channels + c_offsets, tl.sum(grad_hidden, axis=0), mask=c_valid)
            tile = rows[:, None] * channels + c_offsets[None, :]
            if DETERMINISTIC:
                buffer = grad_rows_ptr + (anchor - anchor_start) * k * channels
                tl.store(buffer + k_offsets[:, None] * channels + c_offsets[None, :], grad_hidden, mask=both)
            else:
                tl.atomic_add(grad_u_ptr + region * num_points * channels + tile, grad_hidden, mask=both, sem="relaxed")
            g_gamma = tl.load(partial_gamma + c_offsets, mask=c_valid, other=0.0) + tl.sum(grad_rows * xhat, axis=0)
            g_beta = tl.load(partial_beta + c_offsets, mask=c_valid, other=0.0) + tl.sum(grad_rows, axis=0)
            tl.store(partial_gamma + c_offsets, g_gamma, mask=c_valid)
            tl.store(partial_beta + c_offsets, g_beta, mask=c_valid)


def _config(kernel_name: str, k: int, channels: int) -> dict:
    """[BLOCK_K, BLOCK_C] tiles of 4K values on 4 warps forward; the backward holds about twice
    as many live tiles, so 2K values on 8 warps (no spills on sm_80/90, ptxas_report.json)."""
    block_k = next_power_of_2(k)
    values, warps = (4096, 4) if kernel_name == "group_pool_fwd" else (2048, 8)
    return blocks(kernel_name, BLOCK_K=block_k, BLOCK_C=min(next_power_of_2(channels), max(16, values // block_k)), num_warps=warps)


class _GroupPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, point_u, anchor_v, neighbour_index, ln_weight, ln_bias, eps: float, pool: str):
        num_regions, num_points, channels = point_u.shape
        num_anchors, k = neighbour_index.shape[1:]
        device = point_u.device
        total = num_regions * num_anchors
        out = torch.empty(total, channels, dtype=torch.float32, device=device)
        mean = torch.empty(total, k, dtype=torch.float32, device=device)
        rstd = torch.empty(total, k, dtype=torch.float32, device=device)
        winner_dtype = torch.int32 if k <= 32 else torch.int64
        winners = torch.empty((total, channels) if pool == "max" else (0,), dtype=winner_dtype, device=device)
        if total:
            with device_guard(point_u):
                _group_pool_fwd[(total,)](
                    point_u, anchor_v, neighbour_index, ln_weight, ln_bias, out, mean, rstd, winners,
                    num_points, num_anchors, channels, k, eps,
                    MAX_POOL=pool == "max", **_config("group_pool_fwd", k, channels),
                )
        ctx.save_for_backward(point_u, anchor_v, neighbour_index, ln_weight, mean, rstd, winners)
        ctx.pool, ctx.bias_dtype = pool, ln_bias.dtype
        return out.view(num_regions, num_anchors, channels).to(point_u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        point_u, anchor_v, neighbour_index, ln_weight, mean, rstd, winners = ctx.saved_tensors
        num_regions, num_points, channels = point_u.shape
        num_anchors, k = neighbour_index.shape[1:]
        total = num_regions * num_anchors
        device = point_u.device
        grad_u = torch.zeros(point_u.shape, dtype=torch.float32, device=device)
        grad_v = torch.empty(total, channels, dtype=torch.float32, device=device)
        config = _config("group_pool_bwd", k, channels)
        programs = max(1, min(total, num_programs_cap(device, per_sm=4)))
        partials = torch.zeros(2, programs, channels, dtype=torch.float32, device=device)
        exact = deterministic()
        chunk = max(1, _DETERMINISTIC_CHUNK // (k * channels)) if exact else max(1, total)
        grad_rows = grad_u  # unused unless deterministic: then one chunk's row gradients for index_add_
        if exact:
            grad_rows = torch.empty(min(chunk, total) * k, channels, dtype=torch.float32, device=device)
            flat_rows = (neighbour_index + torch.arange(num_regions, device=device).view(-1, 1, 1) * num_points).view(-1)
        grad_out = grad_out.contiguous()
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            with device_guard(point_u):
                _group_pool_bwd[(programs,)](
                    point_u, anchor_v, neighbour_index, ln_weight, mean, rstd, winners, grad_out,
                    grad_u, grad_v, partials[0], partials[1], grad_rows,
                    num_points, num_anchors, channels, k, start, stop,
                    MAX_POOL=ctx.pool == "max", DETERMINISTIC=exact, **config,
                )
            if exact:
                grad_u.view(-1, channels).index_add_(0, flat_rows[start * k : stop * k], grad_rows[: (stop - start) * k])
        grad_gamma, grad_beta = partials.sum(1)
        return (
            grad_u.to(point_u.dtype),
            grad_v.view(anchor_v.shape).to(anchor_v.dtype),
            None,
            grad_gamma.to(ln_weight.dtype),
            grad_beta.to(ctx.bias_dtype),
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
    """Same contract as `folded.group_pool`: [R, N, D], [R, M, D], [R, M, k] -> [R, M, D]."""
    if pool not in POOLER_MODES:
        raise ValueError(f"pool must be one of {POOLER_MODES}, got {pool!r}")
    if point_u.dim() != 3 or anchor_v.dim() != 3 or neighbour_index.dim() != 3:
        raise ValueError("group_pool expects point_u [R, N, D], anchor_v [R, M, D], neighbour_index [R, M, k]")
    check_device(point_u, anchor_v, neighbour_index, ln_weight, ln_bias)
    if pool == "max" and neighbour_index.shape[-1] > MAX_WINNER_BITS:  # winners no longer fit one int64
        return folded.group_pool(point_u, anchor_v, neighbour_index, ln_weight, ln_bias, eps, pool)
    if point_u.shape[1] * point_u.shape[2] >= 2**31:
        raise ValueError(f"a region's U ({point_u.shape[1]}x{point_u.shape[2]}) exceeds int32 offsets")
    return _GroupPool.apply(
        point_u.contiguous(), anchor_v.contiguous(), neighbour_index.contiguous(),
        ln_weight.contiguous(), ln_bias.contiguous(), float(eps), pool,
    )
