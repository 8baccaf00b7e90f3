"""The non-geometric region feature path (`region_geo_sampler` false in the config).

The released models that skip the GeoRegionSampler project the CLIP map with one Linear
(`model.region_fea_adapter.{weight,bias}`) and average it under each region mask. Subclassing
nn.Linear keeps exactly those state-dict names; `forward` is the region module's call, the same
as GeoRegionSampler's (feature maps and per-image masks in, per-image region features out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferret_kernels import ops


class MaskPoolingRegionAdapter(nn.Linear):
    def __init__(self, input_dim: int, output_dim: int, num_points: int | None = 512, feature_layout: str = "official"):
        super().__init__(input_dim, output_dim)
        self.num_points = num_points
        self.feature_layout = feature_layout

    def forward(
        self,
        feature_maps: torch.Tensor,
        region_masks: Sequence[Sequence[torch.Tensor]],
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor | None]:
        """feature_maps [B, S*S, C_in] and per-image lists of (W, H) masks -> per image [R_i, C_out] or None."""
        if len(region_masks) != feature_maps.shape[0]:
            raise ValueError(f"{feature_maps.shape[0]} feature maps but {len(region_masks)} mask lists")
        projected = F.linear(feature_maps, self.weight, self.bias)
        flat_masks = [mask for masks in region_masks for mask in masks]
        if not flat_masks:
            return [None] * len(region_masks)
        image_index = torch.tensor(
            [image for image, masks in enumerate(region_masks) for _ in masks], device=feature_maps.device
        )
        pooled = ops.mask_average_pool(
            projected, flat_masks, image_index, num_points=self.num_points, layout=self.feature_layout, generator=generator
        )
        result: list[torch.Tensor | None] = []
        start = 0
        for masks in region_masks:
            result.append(pooled[start : start + len(masks)] if masks else None)
            start += len(masks)
        return result
