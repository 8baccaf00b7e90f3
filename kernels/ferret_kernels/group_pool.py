"""Fused group pool of one folded sampler stage, as Triton kernels.

With U [R, N, D] the per-point projection and V [R, M, D] the per-anchor one (see `fast`), the
stage output is  pool_j LayerNorm(ReLU(U[idx[r, a, j]] + V[r, a]))  over the k neighbours j.

Forward: one program per anchor; pass 1 walks the channels in blocks accumulating the fp32 sum and
sum of squares of every neighbour row, pass 2 recomputes the rows, normalises and pools. It stores
only the pooled output and the per-row mean / rstd ([R, M, k]).
Backward: one program per anchor; recompute rows, find the max winners by equality with the saved
output (ties split evenly, as the reference's `amax`), pass 1 the two LayerNorm reductions, pass 2
the row gradient, written to dV and atomically added to dU. Nothing of size [R, M, k, D] is ever
materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._triton import check_device, interpreting, next_power_of_2

__all__ = ["group_pool"]


@triton.jit
def _load_rows(u_ptr, v_ptr, rows, k_valid, anchor, channels, c_offsets, c_valid):
    """ReLU(U[rows] + V[anchor]) for one channel block -> fp32 [BLOCK_K, BLOCK_C] (0 where invalid)."""
    both = k_valid[:, None] & c_valid[None, :]
    u = tl.load(u_ptr + rows[:, None] * channels + c_offsets[None, :], mask=both, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + anchor * channels + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
    hidden = u + v[None, :]
    return tl.where(both, tl.maximum(hidden, 0.0), 0.0)


@triton.jit
def _group_pool_fwd(
    u_ptr, v_ptr, index_ptr, gamma_ptr, beta_ptr, out_ptr, mean_ptr, rstd_ptr,
    num_points, num_anchors, channels, k, eps,
    MAX_POOL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    anchor = tl.program_id(0).to(tl.int64)  # flat over R * M
    region = anchor // num_anchors
    k_offsets = tl.arange(0, BLOCK_K)
    k_valid = k_offsets < k
    rows = tl.load(index_ptr + anchor * k + k_offsets, mask=k_valid, other=0).to(tl.int64) + region * num_points
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c_offsets = c0 + tl.arange(0, BLOCK_C)
        c_valid = c_offsets < channels
        hidden = _load_rows(u_ptr, v_ptr, rows, k_valid, anchor, channels, c_offsets, c_valid)
        total += tl.sum(hidden, axis=1)
        total_sq += tl.sum(hidden * hidden, axis=1)
    mean = total / channels
    var = tl.maximum(total_sq / channels - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + anchor * k + k_offsets, mean, mask=k_valid)
    tl.store(rstd_ptr + anchor * k + k_offsets, rstd, mask=k_valid)
    for c0 in range(0, channels, BLOCK_C):
        c_offsets = c0 + tl.arange(0, BLOCK_C)
        c_valid = c_offsets < channels
        hidden = _load_rows(u_ptr, v_ptr, rows, k_valid, anchor, channels, c_offsets, c_valid)
        gamma = tl.load(gamma_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        normed = (hidden - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        if MAX_POOL:
            pooled = tl.max(tl.where(k_valid[:, None], normed, float("-inf")), axis=0)
        else:
            pooled = tl.sum(tl.where(k_valid[:, None], normed, 0.0), axis=0) / k
        tl.store(out_ptr + anchor * channels + c_offsets, pooled, mask=c_valid)


@triton.jit
def _row_grads(hidden, mean, rstd, gamma, beta, grad, pooled, k_valid, k, MAX_POOL: tl.constexpr):
    """Per-row gradient of the pooled output wrt the normalised rows, and the rows' xhat."""
    xhat = (hidden - mean[:, None]) * rstd[:, None]
    if MAX_POOL:
        normed = xhat * gamma[None, :] + beta[None, :]
        winners = (normed == pooled[None, :]) & k_valid[:, None]
        count = tl.sum(winners.to(tl.float32), axis=0)
        grad_rows = tl.where(winners, (grad / tl.maximum(count, 1.0))[None, :], 0.0)
    else:
        grad_rows = tl.where(k_valid[:, None], (grad / k)[None, :], 0.0)
    return grad_rows, xhat


@triton.jit
def _group_pool_bwd(
    u_ptr, v_ptr, index_ptr, gamma_ptr, beta_ptr, out_ptr, mean_ptr, rstd_ptr, grad_out_ptr,
    grad_u_ptr, grad_v_ptr, grad_gamma_ptr, grad_beta_ptr,
    num_points, num_anchors, channels, k,
    MAX_POOL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    anchor = tl.program_id(0).to(tl.int64)
    region = anchor // num_anchors
    k_offsets = tl.arange(0, BLOCK_K)
    k_valid = k_offsets < k
    rows = tl.load(index_ptr + anchor * k + k_offsets, mask=k_valid, other=0).to(tl.int64) + region * num_points
    mean = tl.load(mean_ptr + anchor * k + k_offsets, mask=k_valid, other=0.0)
    rstd = tl.load(rstd_ptr + anchor * k + k_offsets, mask=k_valid, other=0.0)
    # Pass 1: the LayerNorm backward reductions sum_c(g*dy) and sum_c(g*dy*xhat) per row.
    dot_g = tl.zeros([BLOCK_K], dtype=tl.float32)
    dot_gx = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c_offsets = c0 + tl.arange(0, BLOCK_C)
        c_valid = c_offsets < channels
        hidden = _load_rows(u_ptr, v_ptr, rows, k_valid, anchor, channels, c_offsets, c_valid)
        gamma = tl.load(gamma_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        pooled = tl.load(out_ptr + anchor * channels + c_offsets, mask=c_valid, other=0.0)
        grad = tl.load(grad_out_ptr + anchor * channels + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        grad_rows, xhat = _row_grads(hidden, mean, rstd, gamma, beta, grad, pooled, k_valid, k, MAX_POOL)
        scaled = grad_rows * gamma[None, :]
        dot_g += tl.sum(scaled, axis=1)
        dot_gx += tl.sum(scaled * xhat, axis=1)
    dot_g = dot_g / channels
    dot_gx = dot_gx / channels
    # Pass 2: d hidden = rstd (g dy - mean(g dy) - xhat mean(g dy xhat)), through the ReLU.
    for c0 in range(0, channels, BLOCK_C):
        c_offsets = c0 + tl.arange(0, BLOCK_C)
        c_valid = c_offsets < channels
        both = k_valid[:, None] & c_valid[None, :]
        hidden = _load_rows(u_ptr, v_ptr, rows, k_valid, anchor, channels, c_offsets, c_valid)
        gamma = tl.load(gamma_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        pooled = tl.load(out_ptr + anchor * channels + c_offsets, mask=c_valid, other=0.0)
        grad = tl.load(grad_out_ptr + anchor * channels + c_offsets, mask=c_valid, other=0.0).to(tl.float32)
        grad_rows, xhat = _row_grads(hidden, mean, rstd, gamma, beta, grad, pooled, k_valid, k, MAX_POOL)
        grad_hidden = rstd[:, None] * (grad_rows * gamma[None, :] - dot_g[:, None] - xhat * dot_gx[:, None])
        grad_hidden = tl.where(both & (hidden > 0.0), grad_hidden, 0.0)
        tl.store(grad_v_ptr + anchor * channels + c_offsets, tl.sum(grad_hidden, axis=0), mask=c_valid)
        tl.atomic_add(grad_u_ptr + rows[:, None] * channels + c_offsets[None, :], grad_hidden, mask=both)
        tl.store(grad_gamma_ptr + anchor * channels + c_offsets, tl.sum(grad_rows * xhat, axis=0), mask=c_valid)
        tl.store(grad_beta_ptr + anchor * channels + c_offsets, tl.sum(grad_rows, axis=0), mask=c_valid)


def _blocks(k: int, channels: int) -> tuple[int, int]:
    block_k = next_power_of_2(k)
    block_c = min(next_power_of_2(channels), max(16, 4096 // block_k))
    if interpreting():  # fewer, larger loop iterations: the interpreter pays per iteration
        block_c = next_power_of_2(channels)
    return block_k, block_c


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
        block_k, block_c = _blocks(k, channels)
        if total:
            _group_pool_fwd[(total,)](
                point_u, anchor_v, neighbour_index, ln_weight, ln_bias, out, mean, rstd,
                num_points, num_anchors, channels, k, eps,
                MAX_POOL=pool == "max", BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4,
            )
        ctx.save_for_backward(point_u, anchor_v, neighbour_index, ln_weight, ln_bias, out, mean, rstd)
        ctx.meta = (pool, k)
        return out.view(num_regions, num_anchors, channels).to(point_u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        point_u, anchor_v, neighbour_index, ln_weight, ln_bias, out, mean, rstd = ctx.saved_tensors
        pool, k = ctx.meta
        num_regions, num_points, channels = point_u.shape
        num_anchors = neighbour_index.shape[1]
        total = num_regions * num_anchors
        device = point_u.device
        grad_u = torch.zeros(point_u.shape, dtype=torch.float32, device=device)
        grad_v = torch.empty(total, channels, dtype=torch.float32, device=device)
        grad_gamma = torch.empty(total, channels, dtype=torch.float32, device=device)
        grad_beta = torch.empty(total, channels, dtype=torch.float32, device=device)
        block_k, block_c = _blocks(k, channels)
        if total:
            _group_pool_bwd[(total,)](
                point_u, anchor_v, neighbour_index, ln_weight, ln_bias, out, mean, rstd, grad_out.contiguous(),
                grad_u, grad_v, grad_gamma, grad_beta,
                num_points, num_anchors, channels, k,
                MAX_POOL=pool == "max", BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4,
            )
        return (
            grad_u.to(point_u.dtype),
            grad_v.view(anchor_v.shape).to(anchor_v.dtype),
            None,
            grad_gamma.sum(0).to(ln_weight.dtype),
            grad_beta.sum(0).to(ln_bias.dtype),
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
    """Same contract as `fast.group_pool`: [R, N, D], [R, M, D], [R, M, k] -> [R, M, D]."""
    if pool not in reference.POOLS:
        raise ValueError(f"pool must be one of {reference.POOLS}, got {pool!r}")
    if point_u.dim() != 3 or anchor_v.dim() != 3 or neighbour_index.dim() != 3:
        raise ValueError("group_pool expects point_u [R, N, D], anchor_v [R, M, D], neighbour_index [R, M, k]")
    check_device(point_u, anchor_v, neighbour_index)
    return _GroupPool.apply(
        point_u.contiguous(), anchor_v.contiguous(), neighbour_index.contiguous(),
        ln_weight.contiguous(), ln_bias.contiguous(), float(eps), pool,
    )
