"""k-nearest-neighbour indices in 2-D as a Triton kernel.

One program per (region, block of queries): the squared distances to every reference point (by the
released |q|^2 + |r|^2 - 2 q.r expansion, as the reference) sit in a [BLOCK_Q, BLOCK_N] tile; k rounds of argmin (ties -> lowest index) each emit one neighbour and
mask it out, so the order is nearest first as in `reference.knn_indices`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_device, next_power_of_2

__all__ = ["knn_indices"]


@triton.jit
def _knn_kernel(
    query_ptr, ref_ptr, query_norm_ptr, ref_norm_ptr, out_ptr, num_queries, num_refs, k,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    region = tl.program_id(0).to(tl.int64)
    q_offsets = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n_offsets = tl.arange(0, BLOCK_N)
    q_valid = q_offsets < num_queries
    n_valid = n_offsets < num_refs
    q_base = query_ptr + region * num_queries * 2
    r_base = ref_ptr + region * num_refs * 2
    qx = tl.load(q_base + q_offsets * 2, mask=q_valid, other=0.0)
    qy = tl.load(q_base + q_offsets * 2 + 1, mask=q_valid, other=0.0)
    rx = tl.load(r_base + n_offsets * 2, mask=n_valid, other=0.0)
    ry = tl.load(r_base + n_offsets * 2 + 1, mask=n_valid, other=0.0)
    # The released expansion |q|^2 + |r|^2 - 2 q.r, rounded exactly as `reference.squared_distances`
    # on CPU (near-ties at the k-th neighbour are decided by it): the 2-term matmul is
    # fma(qy, ry, qx * rx); the squared norms come from torch so no FMA contraction can alter them.
    q_norm = tl.load(query_norm_ptr + region * num_queries + q_offsets, mask=q_valid, other=0.0)
    r_norm = tl.load(ref_norm_ptr + region * num_refs + n_offsets, mask=n_valid, other=0.0)
    dot = tl.fma(qy[:, None], ry[None, :], qx[:, None] * rx[None, :])
    distance = -2.0 * dot + q_norm[:, None]
    distance = distance + r_norm[None, :]
    distance = tl.where(n_valid[None, :], distance, float("inf"))
    out_base = out_ptr + region * num_queries * k + q_offsets.to(tl.int64) * k
    for j in range(k):
        nearest = tl.argmin(distance, axis=1, tie_break_left=True)
        tl.store(out_base + j, nearest.to(tl.int64), mask=q_valid)
        distance = tl.where(n_offsets[None, :] == nearest[:, None], float("inf"), distance)


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
    block_n = next_power_of_2(num_refs)
    # Keep the distance tile near 8K fp32 values per program.
    block_q = max(1, min(next_power_of_2(num_queries), 8192 // block_n))
    grid = (num_regions, triton.cdiv(num_queries, block_q))
    query = query.detach().float().contiguous()
    ref = ref.detach().float().contiguous()
    _knn_kernel[grid](
        query, ref, (query**2).sum(-1), (ref**2).sum(-1), out, num_queries, num_refs, k,
        BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=4,
    )
    return out
