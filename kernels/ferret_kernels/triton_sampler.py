"""The region sampler assembled from the Triton kernels.

Per stage: FPS kernel -> anchor gather -> kNN kernel -> folded projections (plain matmuls: cuBLAS on
GPU, see `folded`) -> fused group-pool kernel. No host synchronisation anywhere (shapes are static,
random FPS starts come from a device generator), so the forward can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from . import folded
from .fps import farthest_point_sample
from .group_pool import group_pool
from .knn import knn_indices
from .params import SamplerGeometry, SamplerParams, StageParams
from .point_features_kernel import point_features

__all__ = ["sampler_stage", "geo_region_sampler", "geo_region_sampler_from_maps", "TRITON_KERNELS"]


def sampler_stage(
    xy: torch.Tensor,
    features: torch.Tensor,
    stage_params: StageParams,
    num_sub_point: int,
    num_neighbor: int,
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.sampler_stage`: `folded.sampler_stage` with the Triton kernels."""
    return folded.sampler_stage(
        xy, features, stage_params, num_sub_point, num_neighbor, pool, fps_start, generator, kernels=TRITON_KERNELS
    )


def geo_region_sampler(
    points: torch.Tensor,
    features: torch.Tensor,
    params: SamplerParams,
    geometry: SamplerGeometry = SamplerGeometry(),
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Same contract as `reference.geo_region_sampler`."""
    return folded.geo_region_sampler(
        points, features, params, geometry, pool, fps_start, generator, stage_fn=sampler_stage
    )


TRITON_KERNELS = folded.SamplerKernels(farthest_point_sample, knn_indices, point_features, group_pool, sampler_stage)


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
) -> torch.Tensor:
    """Same contract as `folded.geo_region_sampler_from_maps` (stage-1 projection on the maps, then
    sampled by the bilinear kernel), assembled from the Triton kernels."""
    return folded.geo_region_sampler_from_maps(
        feature_maps, points, image_index, params, geometry, pool, fps_start, generator, layout,
        kernels=TRITON_KERNELS,
    )
