"""Plain-PyTorch reference of Ferret's region sampler: the oracle for tests and benchmarks.

Written from the math of the released sampler (points drawn inside each mask, bilinear features of
the CLIP map at them, then per stage farthest-point sampling, kNN, an MLP on (neighbour - anchor)
and pooling over the neighbours, then two Linear layers). Every op is batched over regions R; the
only Python loops are the inherently sequential farthest-point iterations, the sampler stages,
and the per-mask pixel listing (masks differ in size and pixel count).

Conventions
- Masks use the official layout: a bool tensor indexed [x, y], shape (W, H).
- Points are normalised (x / W, y / H), so they lie in [0, 1).
- Feature maps are [B, S*S, C]: a square S x S grid, row-major (row = image y).
- Geometry (farthest-point sampling, kNN) is computed in fp32 whatever the feature dtype;
  the released code did it in the model dtype, where bf16 creates many spurious ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .params import FEATURE_LAYOUTS, POOLER_MODES, SamplerGeometry, SamplerParams, StageParams

__all__ = [
    "SamplerParams",
    "StageParams",
    "sample_mask_points",
    "mask_points_nonzero_order",
    "point_features",
    "farthest_point_sample",
    "knn_indices",
    "squared_distances",
    "gather_points",
    "sampler_stage",
    "check_sampler_inputs",
    "geo_region_sampler",
    "mask_average_pool",
]

MaskInput = Sequence[torch.Tensor] | torch.Tensor


# --------------------------------------------------------------------------- masks -> points


def _as_mask_list(masks: MaskInput) -> list[torch.Tensor]:
    """Accept a list of (W, H) masks or one [R, W, H] tensor; return bool (W, H) masks."""
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3:
            raise ValueError(f"a mask tensor must be [R, W, H], got shape {tuple(masks.shape)}")
        masks = list(masks.unbind(0))
    result = []
    for index, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"region {index}: mask must be a 2-D (W, H) tensor, got {shape}")
        result.append(mask if mask.dtype == torch.bool else mask != 0)
    return result


def _mask_pixels(mask: torch.Tensor, region: int) -> torch.Tensor:
    """Pixel coordinates [P, 2] = (x, y) of a (W, H) mask in nonzero() order; empty -> ValueError."""
    pixels = mask.nonzero()
    if pixels.shape[0] == 0:
        raise ValueError(f"region {region}: mask of shape {tuple(mask.shape)} is empty (no pixel set)")
    return pixels


def _normalise(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    size = torch.tensor(mask.shape, dtype=torch.float32, device=pixels.device)
    return pixels.to(torch.float32) / size


def _random_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def sample_mask_points(
    masks: MaskInput, num_points: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample `num_points` pixels inside each mask -> float32 [R, num_points, 2] of (x/W, y/H).

    As the released `rand_sample_repeat`: a mask with at least `num_points` pixels gives a
    uniform draw without replacement; a smaller mask gives every pixel once (nonzero order)
    followed by `num_points - P` pixels drawn uniformly with replacement. All randomness comes
    from `generator`. An empty mask raises ValueError naming its region index.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    mask_list = _as_mask_list(masks)
    if not mask_list:
        raise ValueError("no masks given")
    return torch.stack([_sample_one_mask(mask, region, num_points, generator) for region, mask in enumerate(mask_list)])


def _sample_one_mask(mask: torch.Tensor, region: int, num_points: int, generator: torch.Generator | None) -> torch.Tensor:
    """`sample_mask_points` of one (W, H) bool mask -> [num_points, 2]."""
    pixels = _mask_pixels(mask, region)
    count = pixels.shape[0]
    device = _random_device(generator, pixels.device)
    if count >= num_points:
        chosen = torch.randperm(count, generator=generator, device=device)[:num_points]
    else:
        extra = torch.randint(0, count, (num_points - count,), generator=generator, device=device)
        chosen = torch.cat([torch.arange(count, device=device), extra])
    return _normalise(pixels[chosen.to(pixels.device)], mask)


def mask_points_nonzero_order(mask: torch.Tensor, num_points: int) -> torch.Tensor:
    """All pixels of a mask with exactly `num_points` pixels, in nonzero() order -> [num_points, 2].

    This is the released behaviour for that case (no randomness), used to replay its output.
    """
    (mask,) = _as_mask_list([mask])
    pixels = _mask_pixels(mask, 0)
    if pixels.shape[0] != num_points:
        raise ValueError(
            f"mask has {pixels.shape[0]} pixels; the deterministic nonzero order needs exactly {num_points}"
        )
    return _normalise(pixels, mask)


# --------------------------------------------------------------------------- points -> features


def _grid_side(feature_maps: torch.Tensor) -> int:
    if feature_maps.dim() != 3:
        raise ValueError(f"feature_maps must be [B, HW, C], got shape {tuple(feature_maps.shape)}")
    side = math.isqrt(feature_maps.shape[1])
    if side * side != feature_maps.shape[1]:
        raise ValueError(f"feature_maps have {feature_maps.shape[1]} cells, not a square grid")
    return side


def _check_image_index(image_index: torch.Tensor, num_regions: int, num_images: int) -> None:
    if image_index.shape != (num_regions,):
        raise ValueError(f"image_index must be [{num_regions}], got shape {tuple(image_index.shape)}")
    # Range check needs the values on the host: only done where that costs no device sync.
    if image_index.device.type == "cpu" and num_regions and (
        int(image_index.min()) < 0 or int(image_index.max()) >= num_images
    ):
        raise ValueError(f"image_index values must lie in [0, {num_images}), got {image_index.tolist()}")


def point_features(
    feature_maps: torch.Tensor,
    points: torch.Tensor,
    image_index: torch.Tensor,
    layout: str = "official",
) -> torch.Tensor:
    """Bilinear features of each region's points -> [R, N, C] in the feature dtype.

    feature_maps [B, S*S, C] (row-major), points [R, N, 2] as (x/W, y/H), image_index [R] long
    (which map each region reads). Sampling is bilinear with align_corners=True in fp32 (fp64
    inputs stay fp64).
    layout "official" reproduces the released code, which hands grid_sample the normalised
    (y, x), i.e. reads the transposed location; "aligned" reads the true location.
    """
    if layout not in FEATURE_LAYOUTS:
        raise ValueError(f"layout must be one of {FEATURE_LAYOUTS}, got {layout!r}")
    side = _grid_side(feature_maps)
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, N, 2], got shape {tuple(points.shape)}")
    _check_image_index(image_index, points.shape[0], feature_maps.shape[0])
    # fp32 at least (grid_sample has no bf16 path in the released setup; fp64 stays fp64).
    compute_dtype = torch.promote_types(feature_maps.dtype, torch.float32)
    maps = feature_maps[image_index].to(compute_dtype)  # [R, S*S, C]
    maps = maps.reshape(-1, side, side, feature_maps.shape[-1]).permute(0, 3, 1, 2)  # [R, C, S, S]
    grid_xy = points.to(compute_dtype)
    grid_xy = grid_xy.flip(-1) if layout == "official" else grid_xy
    grid = (2.0 * grid_xy - 1.0).unsqueeze(2)  # [R, N, 1, 2]
    sampled = F.grid_sample(maps, grid, mode="bilinear", align_corners=True)  # [R, C, N, 1]
    return sampled.squeeze(-1).transpose(1, 2).to(feature_maps.dtype)


# --------------------------------------------------------------------------- geometry


def gather_points(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [R, N, C], index [R, ...] -> [R, ..., C]: per-region row gather (differentiable)."""
    regions = torch.arange(values.shape[0], device=values.device)
    return values[regions.view(-1, *([1] * (index.dim() - 1))), index]


def _start_index(
    start_index: torch.Tensor | int | None,
    num_regions: int,
    num_points: int,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if start_index is None:
        draw_device = _random_device(generator, device)
        return torch.randint(0, num_points, (num_regions,), generator=generator, device=draw_device).to(device)
    if isinstance(start_index, int):
        start_index = torch.full((num_regions,), start_index, dtype=torch.long, device=device)
    if start_index.shape != (num_regions,):
        raise ValueError(f"start_index must be [{num_regions}], got shape {tuple(start_index.shape)}")
    if start_index.device.type == "cpu" and num_regions and (
        int(start_index.min()) < 0 or int(start_index.max()) >= num_points
    ):
        raise ValueError(f"start_index values must lie in [0, {num_points})")
    return start_index.to(device=device, dtype=torch.long)


def farthest_point_sample(
    xy: torch.Tensor,
    num_samples: int,
    start_index: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Farthest-point sampling on [R, N, 2] -> LongTensor [R, num_samples] of point indices.

    Greedy: start at `start_index` (None -> uniform from `generator`), keep each point's squared
    Euclidean distance to the nearest chosen point, pick the farthest next (ties -> lowest index).
    """
    if xy.dim() != 3:
        raise ValueError(f"xy must be [R, N, D], got shape {tuple(xy.shape)}")
    num_regions, num_points, _ = xy.shape
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"num_samples must be in [1, {num_points}], got {num_samples}")
    coords = xy.detach().float()
    current = _start_index(start_index, num_regions, num_points, xy.device, generator)
    chosen = torch.empty(num_regions, num_samples, dtype=torch.long, device=xy.device)
    nearest = torch.full((num_regions, num_points), float("inf"), device=xy.device)
    for step in range(num_samples):
        chosen[:, step] = current
        anchor = gather_points(coords, current.unsqueeze(1))  # [R, 1, 2]
        nearest = torch.minimum(nearest, ((coords - anchor) ** 2).sum(-1))
        current = nearest.argmax(dim=-1)  # first maximum -> lowest index on ties
    return chosen


def squared_distances(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[R, M, D] x [R, N, D] -> [R, M, N] squared distances in fp32, by the released expansion.

    |q|^2 + |r|^2 - 2 q.r (same operation order as the released `square_distance`), not the
    direct (q - r)^2: the two round differently, and near-ties at the k-th neighbour (gaps of
    ~1e-8 occur among 512 random points) decide which neighbour set the released weights saw.
    """
    query, ref = query.detach().float(), ref.detach().float()
    distance = -2.0 * torch.matmul(query, ref.transpose(1, 2))
    distance = distance + (query**2).sum(-1).unsqueeze(2)
    return distance + (ref**2).sum(-1).unsqueeze(1)


def knn_indices(query: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest `ref` points of each `query` point -> LongTensor [R, M, k].

    The neighbour SET is the released one: torch.topk over `squared_distances`; where several
    points tie exactly at the k-th distance (pixel-grid points do), which of them is kept is
    torch.topk's choice, as in the released code (implementation-defined: deterministic on CPU,
    may differ on other devices). Within the set, neighbours are ordered nearest first, ties ->
    lower index (the released order was unspecified; pooling ignores it).
    """
    if query.dim() != 3 or ref.dim() != 3 or query.shape[0] != ref.shape[0]:
        raise ValueError(
            f"query [R, M, D] and ref [R, N, D] expected, got {tuple(query.shape)} and {tuple(ref.shape)}"
        )
    if not 1 <= k <= ref.shape[1]:
        raise ValueError(f"k must be in [1, {ref.shape[1]}], got {k}")
    distance = squared_distances(query, ref)
    chosen = torch.topk(distance, k, dim=-1, largest=False, sorted=False).indices  # released set
    # Order the set: sort by index first, then stably by distance -> (distance, index) order.
    chosen = chosen.sort(dim=-1).values
    order = distance.gather(-1, chosen).sort(dim=-1, stable=True).indices
    return chosen.gather(-1, order)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One released sampler iteration: [R, N, 2], [R, N, D] -> [R, M, 2], [R, M, D].

    Anchors by farthest-point sampling, k nearest neighbours of each anchor, then per neighbour
    Linear((neighbour - anchor) of [feature, xy]) concatenated with the anchor's [feature, xy],
    1x1 conv, ReLU, LayerNorm over channels, and max or mean over the k neighbours.
    """
    if pool not in POOLER_MODES:
        raise ValueError(f"pool must be one of {POOLER_MODES}, got {pool!r}")
    anchor_index = farthest_point_sample(xy, num_sub_point, fps_start, generator)  # [R, M]
    anchor_xy = gather_points(xy, anchor_index)  # [R, M, 2]
    neighbour_index = knn_indices(anchor_xy, xy, num_neighbor)  # [R, M, k]

    point_rows = torch.cat([features, xy.to(features.dtype)], dim=-1)  # [R, N, D+2]
    anchor_rows = gather_points(point_rows, anchor_index).unsqueeze(2)  # [R, M, 1, D+2]
    neighbour_rows = gather_points(point_rows, neighbour_index)  # [R, M, k, D+2]

    diff = F.linear(neighbour_rows - anchor_rows, stage_params.diff_weight, stage_params.diff_bias)
    stacked = torch.cat([diff, anchor_rows.expand_as(diff)], dim=-1)  # [R, M, k, 2(D+2)]
    hidden = F.relu(F.linear(stacked, stage_params.conv_matrix, stage_params.conv_bias))
    hidden = F.layer_norm(
        hidden, hidden.shape[-1:], stage_params.ln_weight, stage_params.ln_bias, stage_params.ln_eps
    )
    pooled = hidden.amax(dim=2) if pool == "max" else hidden.mean(dim=2)
    return anchor_xy, pooled


def check_sampler_inputs(
    points: torch.Tensor,
    features: torch.Tensor,
    params: SamplerParams,
    geometry: SamplerGeometry,
) -> None:
    """Raise ValueError naming the first inconsistency between points, features, weights and geometry.

    Shared by every backend of `geo_region_sampler`, so that all of them reject the same inputs
    with the same messages.
    """
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be [R, N, 2], got shape {tuple(points.shape)}")
    if features.shape[:2] != points.shape[:2]:
        raise ValueError(
            f"features {tuple(features.shape)} do not match points {tuple(points.shape)} in [R, N]"
        )
    params.validate(geometry.num_sub_point)
    if features.shape[-1] != params.input_dim:
        raise ValueError(f"features have width {features.shape[-1]}, the weights expect {params.input_dim}")
    available = points.shape[1]
    for stage, (sub, k) in enumerate(zip(geometry.num_sub_point, geometry.num_neighbor)):
        if not (1 <= sub <= available and 1 <= k <= available):
            raise ValueError(
                f"stage {stage}: num_sub_point {sub} and num_neighbor {k} must be in [1, {available}] (points available)"
            )
        available = sub


def geo_region_sampler(
    points: torch.Tensor,
    features: torch.Tensor,
    params: SamplerParams,
    geometry: SamplerGeometry = SamplerGeometry(),
    pool: str = "max",
    fps_start: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Region embeddings [R, out_dim] from points [R, N, 2] and their features [R, N, D].

    `fps_start` ([R] long, an int, or None = random from `generator`) is used by every stage.
    """
    check_sampler_inputs(points, features, params, geometry)
    xy, hidden = points, features
    for stage, stage_params in enumerate(params.stages):
        xy, hidden = sampler_stage(
            xy, hidden, stage_params, geometry.num_sub_point[stage], geometry.num_neighbor[stage], pool, fps_start, generator
        )
    flat = hidden.flatten(1)  # [R, M_last * D], point-major as in the released code
    return F.linear(F.linear(flat, params.flatten_weight, params.flatten_bias), params.dim_weight, params.dim_bias)


# --------------------------------------------------------------------------- non-geo region feature


def mask_average_pool(
    feature_maps: torch.Tensor,
    masks: MaskInput,
    image_index: torch.Tensor,
    num_points: int | None = 512,
    layout: str = "official",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean feature under each mask -> [R, C]: the released `region_fea_adapter` path.

    The released `extract_region_feature` does not downsample the mask to the 24x24 grid: it
    takes up to `num_points` mask pixels (uniform without replacement when the mask has more,
    otherwise every pixel once), samples the map bilinearly at them exactly like the geo sampler
    (same layout quirk), and averages. `num_points=None` averages over every pixel
    (deterministic). The released code turned an empty mask into a zero vector through
    nan_to_num; here an empty mask raises ValueError naming the region, so no NaN and no silent
    zero can reach the model.
    """
    mask_list = _as_mask_list(masks)
    if not mask_list:
        raise ValueError("no masks given")
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be >= 1 or None, got {num_points}")
    chosen = [_normalise(_mask_pool_pixels(mask, region, num_points, generator), mask)
              for region, mask in enumerate(mask_list)]
    return _average_at_points(feature_maps, chosen, image_index, layout)


def _mask_pool_pixels(mask: torch.Tensor, region: int, num_points: int | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The pixels [P', 2] `mask_average_pool` averages over: `num_points` drawn without
    replacement when the mask has more, else all of them in nonzero() order."""
    pixels = _mask_pixels(mask, region)
    if num_points is not None and pixels.shape[0] > num_points:
        device = _random_device(generator, pixels.device)
        pick = torch.randperm(pixels.shape[0], generator=generator, device=device)[:num_points]
        pixels = pixels[pick.to(pixels.device)]
    return pixels


def _average_at_points(feature_maps: torch.Tensor, chosen: list[torch.Tensor], image_index: torch.Tensor,
                       layout: str) -> torch.Tensor:
    """Mean bilinear feature over each region's normalised points (`chosen`: [P_r, 2] each) -> [R, C]."""
    counts = torch.tensor([c.shape[0] for c in chosen], device=feature_maps.device)
    padded = torch.nn.utils.rnn.pad_sequence(chosen, batch_first=True).to(feature_maps.device)  # [R, Pmax, 2]
    valid = torch.arange(padded.shape[1], device=feature_maps.device) < counts.unsqueeze(1)  # [R, Pmax]
    accumulate_dtype = torch.promote_types(feature_maps.dtype, torch.float32)
    sampled = point_features(feature_maps, padded, image_index, layout).to(accumulate_dtype)  # [R, Pmax, C]
    summed = (sampled * valid.unsqueeze(-1)).sum(dim=1)
    return (summed / counts.unsqueeze(1)).to(feature_maps.dtype)
