"""What every backend of the region sampler is configured with: its weights, geometry and modes.

The weight bundles hold tensors, never copies: `GeoRegionSampler.params()` builds them from the
module's own parameters so that gradients flow back through whichever backend consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["StageParams", "SamplerParams", "SamplerGeometry", "DEFAULT_LN_EPS", "FEATURE_LAYOUTS", "POOLER_MODES"]

# nn.LayerNorm's default; the released ConvReLULN1D does not override it.
DEFAULT_LN_EPS = 1e-5

# "official": features read at the transposed location, as the released code (and weights) did;
# "aligned": at the true location.
FEATURE_LAYOUTS = ("official", "aligned")
# How a stage reduces over an anchor's neighbours (the released models use "max").
POOLER_MODES = ("max", "mean")


@dataclass(frozen=True)
class SamplerGeometry:
    """Points kept by each stage's farthest-point sampling and neighbours pooled per anchor; the
    defaults are the released models' two stages (512 points -> 128 -> 32, k = 24)."""

    num_sub_point: tuple[int, ...] = (128, 32)
    num_neighbor: tuple[int, ...] = (24, 24)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_sub_point", tuple(int(n) for n in self.num_sub_point))
        object.__setattr__(self, "num_neighbor", tuple(int(n) for n in self.num_neighbor))
        if not self.num_sub_point or len(self.num_sub_point) != len(self.num_neighbor):
            raise ValueError(
                f"num_sub_point {self.num_sub_point} and num_neighbor {self.num_neighbor} need one entry "
                "per stage (at least one)"
            )


class StageParams(NamedTuple):
    """Weights of one sampler stage (released `diff_projector_list[i]` + `agg_projector_list[i]`).

    With D the point-feature width: diff projector Linear(D+2 -> D+2), aggregation Conv1d
    (kernel 1, 2(D+2) -> D) followed by ReLU and LayerNorm(D).
    """

    diff_weight: torch.Tensor  # [D+2, D+2]
    diff_bias: torch.Tensor  # [D+2]
    conv_weight: torch.Tensor  # [D, 2(D+2), 1] (Conv1d layout) or [D, 2(D+2)]
    conv_bias: torch.Tensor  # [D]
    ln_weight: torch.Tensor  # [D]
    ln_bias: torch.Tensor  # [D]
    ln_eps: float = DEFAULT_LN_EPS

    @property
    def conv_matrix(self) -> torch.Tensor:
        """The 1x1 convolution as a plain [D, 2(D+2)] matrix (a view, no copy)."""
        return self.conv_weight.squeeze(-1) if self.conv_weight.dim() == 3 else self.conv_weight


@dataclass(frozen=True)
class SamplerParams:
    """All weights of a GeoRegionSampler: the stages, then flatten (M*D -> D) and dim (D -> out)."""

    stages: tuple[StageParams, ...]
    flatten_weight: torch.Tensor  # [D, M_last * D]
    flatten_bias: torch.Tensor  # [D]
    dim_weight: torch.Tensor  # [out_dim, D]
    dim_bias: torch.Tensor  # [out_dim]

    @property
    def input_dim(self) -> int:
        return int(self.flatten_bias.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.dim_bias.shape[0])

    def validate(self, num_sub_point: tuple[int, ...]) -> None:
        """Raise ValueError naming the first weight whose shape does not fit the configuration."""
        width = self.input_dim
        if len(self.stages) != len(num_sub_point):
            raise ValueError(
                f"SamplerParams has {len(self.stages)} stages but num_sub_point has {len(num_sub_point)} entries"
            )
        expected = {
            "diff_weight": (width + 2, width + 2),
            "diff_bias": (width + 2,),
            "conv_matrix": (width, 2 * (width + 2)),
            "conv_bias": (width,),
            "ln_weight": (width,),
            "ln_bias": (width,),
        }
        for index, stage in enumerate(self.stages):
            for name, shape in expected.items():
                actual = tuple(getattr(stage, name).shape)
                if actual != shape:
                    raise ValueError(f"stage {index} {name} has shape {actual}, expected {shape} (input_dim {width})")
        flatten_shape = (width, num_sub_point[-1] * width)
        if tuple(self.flatten_weight.shape) != flatten_shape:
            raise ValueError(
                f"flatten_weight has shape {tuple(self.flatten_weight.shape)}, expected {flatten_shape}"
            )
        if tuple(self.dim_weight.shape) != (self.output_dim, width):
            raise ValueError(
                f"dim_weight has shape {tuple(self.dim_weight.shape)}, expected {(self.output_dim, width)}"
            )
