"""The region sampler's dispatch point: code outside `ferret_kernels` calls only these functions.

Each op takes an optional `backend`; without it the env var FERRET_SAMPLER_BACKEND decides
("auto" by default). Backends: "reference" (plain PyTorch oracle), "fast" (vectorised PyTorch),
"triton" (GPU kernels), "auto" (pick by device). Until the fast and Triton paths land, every
backend routes to the reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import reference
from .params import SamplerParams, StageParams

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "SamplerParams",
    "StageParams",
    "resolve_backend",
    "sample_mask_points",
    "mask_points_nonzero_order",
    "point_features",
    "farthest_point_sample",
    "knn_indices",
    "geo_region_sampler",
    "mask_average_pool",
]

BACKEND_ENV = "FERRET_SAMPLER_BACKEND"
BACKENDS = ("auto", "reference", "fast", "triton")


def resolve_backend(backend: str | None = None) -> str:
    """The backend name to use: the argument, else $FERRET_SAMPLER_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown sampler backend {name!r}; choose one of {BACKENDS} (argument or ${BACKEND_ENV})")
    return name


def sample_mask_points(masks, num_points: int, generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    resolve_backend(backend)
    return reference.sample_mask_points(masks, num_points, generator)


def mask_points_nonzero_order(mask: torch.Tensor, num_points: int, backend: str | None = None) -> torch.Tensor:
    resolve_backend(backend)
    return reference.mask_points_nonzero_order(mask, num_points)


def point_features(
    feature_maps: torch.Tensor,
    points: torch.Tensor,
    image_index: torch.Tensor,
    layout: str = "official",
    backend: str | None = None,
) -> torch.Tensor:
    resolve_backend(backend)
    return reference.point_features(feature_maps, points, image_index, layout)


def farthest_point_sample(
    xy: torch.Tensor,
    num_samples: int,
    start_index: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    resolve_backend(backend)
    return reference.farthest_point_sample(xy, num_samples, start_index, generator)


def knn_indices(query: torch.Tensor, ref: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    resolve_backend(backend)
    return reference.knn_indices(query, ref, k)


def geo_region_sampler(
    points: torch.Tensor,
    features: torch.Tensor,
    params: SamplerParams,
    num_sub_point: Sequence[int] = (128, 32),
    num_neighbor: Sequence[int] = (24, 24),
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    resolve_backend(backend)
    return reference.geo_region_sampler(
        points, features, params, num_sub_point, num_neighbor, pool, fps_start, generator
    )


def mask_average_pool(
    feature_maps: torch.Tensor,
    masks,
    image_index: torch.Tensor,
    num_points: int | None = 512,
    layout: str = "official",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    resolve_backend(backend)
    return reference.mask_average_pool(feature_maps, masks, image_index, num_points, layout, generator)
