"""k-nearest-neighbour indices in 2-D as a Triton kernel.

One program per (region, block of queries). Squared distances by the released |q|^2 + |r|^2 - 2 q.r
expansion, rounded as `reference.squared_distances`. The reference points are walked in tiles of
at most BLOCK_N (so any N fits in registers): round j scans every tile for the nearest point that
comes after round j-1's pick in (distance, index) order, so the k picks are nearest first, ties ->
lowest index, as `reference.knn_indices`. Distances are recomputed per round and tile (a few
flops per pair) rather than kept: at the released N = 512 that is one or two tiles.
Compiled without multiply-add fusion (EXACT_FP) so the only fma is the explicit one below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import EXACT_FP, blocks, check_device, device_guard, next_power_of_2

__all__ = ["knn_indices", "MAX_BLOCK_N"]

MAX_BLOCK_N = 256  # reference points per tile: a [BLOCK_Q, BLOCK_N] fp32 tile stays in registers


@triton.jit
def _distances(qx, qy, q_norm, r_base, ref_norm_base, n_offsets, n_valid):
    """[BLOCK_Q, BLOCK_N] squared distances, rounded exactly as `reference.squared_distances` on
    CPU: the 2-term matmul is fma(qy, ry, qx * rx); the norms come from torch."""
    rx = tl.load(r_base + n_offsets * 2, mask=n_valid, other=0.0)
    ry = tl.load(r_base + n_offsets * 2 + 1, mask=n_valid, other=0.0)
    r_norm = tl.load(ref_norm_base + n_offsets, mask=n_valid, other=0.0)
    dot = tl.fma(qy[:, None], ry[None, :], qx[:, None] * rx[None, :])
    distance = -2.0 * dot + q_norm[:, None]
    return distance + r_norm[None, :]


@triton.jit
def _knn_kernel(
    query_ptr, ref_ptr, query_norm_ptr, ref_norm_ptr, out_ptr, num_queries, num_refs, k,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    region = tl.program_id(0).to(tl.int64)
    q_offsets = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = q_offsets < num_queries
    q_base = query_ptr + region * num_queries * 2
    r_base = ref_ptr + region * num_refs * 2
    ref_norm_base = ref_norm_ptr + region * num_refs
    qx = tl.load(q_base + q_offsets * 2, mask=q_valid, other=0.0)
    qy = tl.load(q_base + q_offsets * 2 + 1, mask=q_valid, other=0.0)
    q_norm = tl.load(query_norm_ptr + region * num_queries + q_offsets, mask=q_valid, other=0.0)
    out_base = out_ptr + region * num_queries * k + q_offsets.to(tl.int64) * k
    last_distance = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    last_index = tl.full([BLOCK_Q], -1, tl.int32)
    for j in range(k):
        best_distance = tl.full([BLOCK_Q], float("inf"), tl.float32)
        best_index = tl.zeros([BLOCK_Q], dtype=tl.int32)
        for n0 in range(0, num_refs, BLOCK_N):
            n_offsets = n0 + tl.arange(0, BLOCK_N)
            n_valid = n_offsets < num_refs
            distance = _distances(qx, qy, q_norm, r_base, ref_norm_base, n_offsets, n_valid)
            after_last = (distance > last_distance[:, None]) | (
                (distance == last_distance[:, None]) & (n_offsets[None, :] > last_index[:, None])
            )
            distance = tl.where(n_valid[None, :] & after_last, distance, float("inf"))
            tile_index = tl.argmin(distance, axis=1, tie_break_left=True)
            tile_distance = tl.min(distance, axis=1)
            # Strictly closer only: an equal distance in a later tile has the higher index.
            closer = tile_distance < best_distance
            best_index = tl.where(closer, n0 + tile_index, best_index)
            best_distance = tl.where(closer, tile_distance, best_distance)
        tl.store(out_base + j, best_index.to(tl.int64), mask=q_valid)
        last_distance = best_distance
        last_index = best_index


def knn_indices(query: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as `reference.knn_indices`: [R, M, 2], [R, N, 2] -> LongTensor [R, M, k]."""
    if query.dim() != 3 or ref.dim() != 3 or query.shape[0] != ref.shape[0] or query.shape[-1] != 2 or ref.shape[-1] != 2:
        raise ValueError(f"query [R, M, 2] and ref [R, N, 2] expected, got {tuple(query.shape)} and {tuple(ref.shape)}")
    if not 1 <= k <= ref.shape[1]:
        raise ValueError(f"k must be in [1, {ref.shape[1]}], got {k}")
    check_device(query, ref)
    num_regions, num_queries, _ = query.shape
    num_refs = ref.shape[1]
    out = torch.empty(num_regions, num_queries, k, dtype=torch.long, device=query.device)
    if num_regions == 0 or num_queries == 0:
        return out
    block_n = min(MAX_BLOCK_N, next_power_of_2(num_refs))
    # A 1K-value distance tile per program: 8 per thread, ~60-90 registers (ptxas_report.json).
    config = blocks("knn", BLOCK_N=block_n, BLOCK_Q=max(1, min(next_power_of_2(num_queries), 1024 // block_n)), num_warps=4)
    grid = (num_regions, triton.cdiv(num_queries, config["BLOCK_Q"]))
    query = query.detach().float().contiguous()
    ref = ref.detach().float().contiguous()
    with device_guard(query):
        _knn_kernel[grid](
            query, ref, (query**2).sum(-1), (ref**2).sum(-1), out, num_queries, num_refs, k, **config, **EXACT_FP,
        )
    return out
