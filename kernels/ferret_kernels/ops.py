"""The region sampler's dispatch point: code outside `ferret_kernels` calls only these functions.

Each op takes an optional `backend`; without it the env var FERRET_SAMPLER_BACKEND decides
("auto" by default). Backends: "reference" (plain PyTorch oracle), "fast" (the `folded` pipeline
in vectorised PyTorch), "triton" (the same pipeline on the GPU kernels), "auto" (pick by device:
CUDA tensors -> Triton, anything else -> fast).
"triton" on CPU tensors runs the kernels under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported); without it the kernels raise a ValueError saying so. The Triton modules are
imported lazily, so the reference and fast paths work where triton is not installed.
"""

from __future__ import annotations

import os

import torch

from . import folded, mask_points_cpu, reference
from .params import SamplerGeometry, SamplerParams, StageParams

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "SamplerGeometry",
    "SamplerParams",
    "StageParams",
    "resolve_backend",
    "sample_mask_points",
    "mask_points_nonzero_order",
    "point_features",
    "farthest_point_sample",
    "knn_indices",
    "geo_region_sampler",
    "geo_region_sampler_from_maps",
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


def _route(backend: str | None, tensor: torch.Tensor | None) -> str:
    """The concrete backend for one call: "reference", "fast" or "triton"."""
    name = resolve_backend(backend)
    if name != "auto":
        return name
    if tensor is not None and tensor.device.type == "cuda" and _triton_available():
        return "triton"
    return "fast"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _on_cpu(tensor: torch.Tensor | None) -> bool:
    return tensor is None or tensor.device.type == "cpu"


def _first_mask(masks) -> torch.Tensor | None:
    if isinstance(masks, torch.Tensor):
        return masks
    return next((m for m in masks if isinstance(m, torch.Tensor)), None)


def sample_mask_points(masks, num_points: int, generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    route = _route(backend, _first_mask(masks))
    if route == "triton":
        from .mask_points import sample_mask_points as triton_sample

        return triton_sample(masks, num_points, generator)
    if route == "reference":
        return reference.sample_mask_points(masks, num_points, generator)
    if not _on_cpu(_first_mask(masks)):
        return folded.sample_mask_points(masks, num_points, generator)
    # On CPU, the reference's draws (a per-mask pass costs no device sync and beats keys + top-k)
    # without listing every mask pixel.
    return mask_points_cpu.sample_mask_points(masks, num_points, generator)


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
    route = _route(backend, feature_maps)
    if route == "triton":
        from .point_features_kernel import point_features as triton_point_features

        return triton_point_features(feature_maps, points, image_index, layout)
    if route == "fast":
        return folded.sample_maps(feature_maps, points, image_index, layout)
    return reference.point_features(feature_maps, points, image_index, layout)


def farthest_point_sample(
    xy: torch.Tensor,
    num_samples: int,
    start_index: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    route = _route(backend, xy)
    if route == "triton":
        from .fps import farthest_point_sample as triton_fps

        return triton_fps(xy, num_samples, start_index, generator)
    if route == "fast":
        return folded.farthest_point_sample(xy, num_samples, start_index, generator)
    return reference.farthest_point_sample(xy, num_samples, start_index, generator)


def knn_indices(query: torch.Tensor, ref: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
    if _route(backend, query) == "triton":
        from .knn import knn_indices as triton_knn

        return triton_knn(query, ref, k)
    return folded.knn_indices(query, ref, k)


def geo_region_sampler(
    points: torch.Tensor,
    features: torch.Tensor,
    params: SamplerParams,
    geometry: SamplerGeometry = SamplerGeometry(),
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    route = _route(backend, features)
    if route == "triton":
        from . import triton_sampler

        return triton_sampler.geo_region_sampler(
            points, features, params, geometry, pool, fps_start, generator
        )
    implementation = folded if route == "fast" else reference
    return implementation.geo_region_sampler(
        points, features, params, geometry, pool, fps_start, generator
    )


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
    backend: str | None = None,
) -> torch.Tensor:
    """Region embeddings straight from the maps: the same result as
    `geo_region_sampler(points, point_features(feature_maps, points, image_index, layout), ...)`.
    The fast path computes stage 1's per-point projection once per image on the map (bilinear
    sampling is linear), which is where most of its speed-up over the two-call form comes from."""
    route = _route(backend, feature_maps)
    if route == "fast":
        return folded.geo_region_sampler_from_maps(
            feature_maps, points, image_index, params, geometry, pool, fps_start, generator, layout
        )
    if route == "triton":
        from . import triton_sampler

        return triton_sampler.geo_region_sampler_from_maps(
            feature_maps, points, image_index, params, geometry, pool, fps_start, generator, layout
        )
    features = point_features(feature_maps, points, image_index, layout, backend=route)
    return geo_region_sampler(
        points, features, params, geometry, pool, fps_start, generator, backend=route
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
    route = _route(backend, feature_maps)
    if route == "triton":
        from .mask_pool import mask_average_pool as triton_mask_pool

        return triton_mask_pool(feature_maps, masks, image_index, num_points, layout, generator)
    if route == "reference":
        implementation = reference
    else:  # as for sample_mask_points: on CPU, the reference's draws without the pixel listing
        implementation = mask_points_cpu if _on_cpu(feature_maps) else folded
    return implementation.mask_average_pool(feature_maps, masks, image_index, num_points, layout, generator)
