"""GeoRegionSampler: the region encoder that turns a referred region into one LLM embedding.

Pipeline (the released sampler's): sample `num_init_point` points inside each region mask,
bilinearly read the CLIP patch map at them, then per stage: farthest-point sampling, k nearest
neighbours, a point-wise MLP on (neighbour - anchor) and pooling over the neighbours; finally
flatten the last stage's points and project to the LLM width.

Parameter names are exactly the released checkpoint's (`diff_projector_list.{i}`,
`agg_projector_list.{i}.net.0`, `agg_projector_list.{i}.norm`, `flatten_projector`,
`dim_projector`), so `load_state_dict` takes the released weights. All computation goes through
`ferret_kernels.ops`, which picks the backend (reference, fast PyTorch or Triton).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ferret_kernels import ops
from ferret_kernels.params import FEATURE_LAYOUTS, POOLER_MODES, SamplerGeometry, SamplerParams, StageParams


class SamplerConfigError(ValueError):
    """The GeoRegionSampler was given an inconsistent geometry or an unknown mode."""


class ConvReLULayerNorm(nn.Module):
    """1x1 Conv1d, ReLU, then LayerNorm over channels (the released `ConvReLULN1D`).

    The submodule names (`net.0` for the conv, `norm`) are the released state-dict names.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size=1), nn.ReLU())
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, N] -> [B, C_out, N]."""
        return self.norm(self.net(x).transpose(1, 2)).transpose(1, 2)


class GeoRegionSampler(nn.Module):
    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_init_point: int = 512,
        num_sub_point: Sequence[int] = SamplerGeometry.num_sub_point,
        num_neighbor: Sequence[int] = SamplerGeometry.num_neighbor,
        pooler_mode: str = "max",
        feature_layout: str = "official",
    ):
        super().__init__()
        num_sub_point, num_neighbor = tuple(int(n) for n in num_sub_point), tuple(int(n) for n in num_neighbor)
        _check_geometry(input_dim, output_dim, num_init_point, num_sub_point, num_neighbor)
        if pooler_mode not in POOLER_MODES:
            raise SamplerConfigError(f"pooler_mode must be one of {POOLER_MODES}, got {pooler_mode!r}")
        if feature_layout not in FEATURE_LAYOUTS:
            raise SamplerConfigError(f"feature_layout must be one of {FEATURE_LAYOUTS}, got {feature_layout!r}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.num_init_point = num_init_point
        self.num_sub_point = num_sub_point
        self.num_neighbor = num_neighbor
        self.geometry = SamplerGeometry(num_sub_point, num_neighbor)
        self.pooler_mode = pooler_mode
        self.feature_layout = feature_layout

        point_width = input_dim + 2  # feature + (x, y)
        self.diff_projector_list = nn.ModuleList(nn.Linear(point_width, point_width) for _ in num_sub_point)
        self.agg_projector_list = nn.ModuleList(
            ConvReLULayerNorm(2 * point_width, input_dim) for _ in num_sub_point
        )
        self.flatten_projector = nn.Linear(input_dim * num_sub_point[-1], input_dim)
        self.dim_projector = nn.Linear(input_dim, output_dim)

    def extra_repr(self) -> str:
        return (
            f"num_init_point={self.num_init_point}, num_sub_point={self.num_sub_point}, "
            f"num_neighbor={self.num_neighbor}, pooler_mode={self.pooler_mode!r}, "
            f"feature_layout={self.feature_layout!r}"
        )

    def params(self) -> SamplerParams:
        """The module's weights as a SamplerParams of the parameters themselves (no copies)."""
        stages = tuple(
            StageParams(
                diff_weight=diff.weight,
                diff_bias=diff.bias,
                conv_weight=agg.net[0].weight,
                conv_bias=agg.net[0].bias,
                ln_weight=agg.norm.weight,
                ln_bias=agg.norm.bias,
                ln_eps=agg.norm.eps,
            )
            for diff, agg in zip(self.diff_projector_list, self.agg_projector_list)
        )
        return SamplerParams(
            stages=stages,
            flatten_weight=self.flatten_projector.weight,
            flatten_bias=self.flatten_projector.bias,
            dim_weight=self.dim_projector.weight,
            dim_bias=self.dim_projector.bias,
        )

    def _check_feature_map(self, feature_map: torch.Tensor) -> None:
        if feature_map.dim() != 3 or feature_map.shape[-1] != self.input_dim:
            raise ValueError(
                f"feature_map must be [B, HW, {self.input_dim}], got shape {tuple(feature_map.shape)}"
            )

    # ----------------------------------------------------------------- the layered API

    def sample_points(self, masks, generator: torch.Generator | None = None) -> torch.Tensor:
        """(W, H) masks (a list, or one [R, W, H] tensor) -> [R, num_init_point, 2] of (x/W, y/H)."""
        return ops.sample_mask_points(masks, self.num_init_point, generator)

    def point_features(
        self, feature_map: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """feature_map [B, S*S, input_dim], points [R, N, 2], image_index [R] -> [R, N, input_dim]."""
        self._check_feature_map(feature_map)
        return ops.point_features(feature_map, points, image_index, layout=self.feature_layout)

    def forward_points(
        self,
        points: torch.Tensor,
        features: torch.Tensor,
        fps_start: torch.Tensor | int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """points [R, N, 2] and their features [R, N, input_dim] -> region embeddings [R, output_dim].

        `fps_start` fixes the first farthest-point index of every stage ([R] long or an int);
        None draws it from `generator` as the released code did.
        """
        weight_dtype = self.flatten_projector.weight.dtype
        return ops.geo_region_sampler(
            points,
            features.to(weight_dtype),
            self.params(),
            geometry=self.geometry,
            pool=self.pooler_mode,
            fps_start=fps_start,
            generator=generator,
        )

    def forward(
        self,
        feature_maps: torch.Tensor,
        region_masks,
        image_index: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor | None]:
        """Region embeddings grouped per image: a list of B entries, [R_i, output_dim] or None.

        feature_maps: [B, S*S, input_dim] CLIP patch features, row-major.
        region_masks, either form:
          * nested (released): B lists, each of that image's (W, H) bool masks (may be empty);
          * packed: a flat list of R masks (or an [R, W, H] tensor) plus `image_index` [R] long
            saying which image each mask belongs to (grouping then reads image_index on the host).
        Images without regions get None.
        """
        self._check_feature_map(feature_maps)
        num_images = feature_maps.shape[0]
        masks, index, counts = _pack_masks(region_masks, image_index, num_images, feature_maps.device)
        if not masks:
            return [None] * num_images
        # On the maps' device (the collator's masks are CPU tensors): a GPU run samples on the GPU.
        points = self.sample_points([mask.to(feature_maps.device) for mask in masks], generator)
        # One call from the maps (not point_features + forward_points): the fast backends
        # project stage 1 once per image on the map, since bilinear sampling is linear.
        weight_dtype = self.flatten_projector.weight.dtype
        embeddings = ops.geo_region_sampler_from_maps(
            feature_maps.to(weight_dtype),
            points,
            index,
            self.params(),
            geometry=self.geometry,
            pool=self.pooler_mode,
            generator=generator,
            layout=self.feature_layout,
        )
        return _split_per_image(embeddings, index, counts, num_images)


# --------------------------------------------------------------------------- helpers


def _check_geometry(
    input_dim: int, output_dim: int, num_init_point: int, num_sub_point: tuple[int, ...], num_neighbor: tuple[int, ...]
) -> None:
    if input_dim < 1 or output_dim < 1:
        raise SamplerConfigError(f"input_dim and output_dim must be positive, got {input_dim} and {output_dim}")
    if not num_sub_point or len(num_sub_point) != len(num_neighbor):
        raise SamplerConfigError(
            f"num_sub_point {num_sub_point} and num_neighbor {num_neighbor} need one entry per stage (at least one)"
        )
    available = num_init_point
    for stage, (sub, k) in enumerate(zip(num_sub_point, num_neighbor)):
        if not (1 <= sub <= available and 1 <= k <= available):
            raise SamplerConfigError(
                f"stage {stage}: num_sub_point {sub} and num_neighbor {k} must lie in [1, {available}], "
                "the points entering that stage"
            )
        available = sub


def _pack_masks(region_masks, image_index, num_images: int, device: torch.device):
    """Normalise both mask forms to (flat mask list, image_index [R] on device, per-image counts or None)."""
    if image_index is None:
        if isinstance(region_masks, torch.Tensor) or len(region_masks) != num_images:
            raise ValueError(
                f"nested region_masks must be one list per image ({num_images}); "
                "pass image_index for a flat list of masks"
            )
        counts = [len(masks) for masks in region_masks]
        flat = [mask for masks in region_masks for mask in masks]
        index = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)], dtype=torch.long, device=device)
        return flat, index, counts
    flat = list(region_masks.unbind(0)) if isinstance(region_masks, torch.Tensor) else list(region_masks)
    if image_index.shape != (len(flat),):
        raise ValueError(f"image_index must be [{len(flat)}] (one per mask), got shape {tuple(image_index.shape)}")
    return flat, image_index.to(device=device, dtype=torch.long), None


def _split_per_image(embeddings: torch.Tensor, index: torch.Tensor, counts, num_images: int):
    if counts is not None:  # nested input: regions are already grouped image by image
        pieces = embeddings.split(counts)
        return [piece if count else None for piece, count in zip(pieces, counts)]
    result = []
    for image in range(num_images):
        selected = embeddings[index == image]
        result.append(selected if selected.shape[0] else None)
    return result
