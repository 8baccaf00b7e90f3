"""The CLIP vision tower, wrapped so that its state-dict names match the released checkpoints.

The released code wraps `CLIPVisionModel` in a module whose attribute is `vision_tower`, so the
weights live under `model.vision_tower.vision_tower.vision_model.*`. transformers 5 flattened
`CLIPVisionModel` (its names lost the `vision_model.` level), so `ClipVisionHolder` puts that level
back: the state-dict names stay those of the released (transformers 4.x) checkpoints.
The tower is built from its config only (never from the hub); weights come either from the
Ferret checkpoint that contains them or from `load_clip_weights(local_folder)`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedConfig


def check_pixel_shape(pixel_values: torch.Tensor, size: int) -> None:
    """A clear error for images that are not [B, 3, size, size] (the processor's output)."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
        raise ValueError(
            f"images must be shaped [B, 3, {size}, {size}] for this vision tower, got {list(pixel_values.shape)}"
        )


class ClipVisionHolder(nn.Module):
    """Holds a CLIPVisionModel under the attribute `vision_model` (released state-dict nesting)."""

    def __init__(self, vision_config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(vision_config)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_model.config

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        return self.vision_model(pixel_values, **kwargs)


class FerretVisionTower(nn.Module):
    def __init__(
        self,
        vision_config: CLIPVisionConfig,
        select_layer: int = -2,
        select_feature: str = "patch",
        frozen: bool = True,
    ):
        super().__init__()
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.vision_tower = ClipVisionHolder(vision_config)
        # Frozen for training by default; the forward stays differentiable so that gradients can
        # flow when a caller unfreezes it.
        self.vision_tower.requires_grad_(not frozen)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def grid_size(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_patches (+1 with cls_patch), hidden]: hidden state of `select_layer`."""
        check_pixel_shape(pixel_values, self.config.image_size)
        weight = self.vision_tower.vision_model.embeddings.patch_embedding.weight
        outputs = self.vision_tower(
            pixel_values.to(device=weight.device, dtype=weight.dtype), output_hidden_states=True
        )
        features = outputs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            features = features[:, 1:]
        return features

    def load_clip_weights(self, folder: str | Path) -> None:
        """Fill the tower from a local CLIP (vision or full) checkpoint folder."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP checkpoint (config.json) in {folder}")
        loaded = CLIPVisionModel.from_pretrained(str(folder), dtype=self.dtype)
        missing, unexpected = self.vision_tower.vision_model.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"CLIP weights in {folder} do not fit the configured tower: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


class ConvVisionConfig(PreTrainedConfig):
    """A small convolutional tower for models trained from scratch (the embedded model).

    A ViT trained from scratch on a few thousand CPU steps learns shapes slowly (patch attention
    has no locality prior); 3x3 convolutions do (issue 13's probe: 0.36 against 0.85 shape
    accuracy after the same 6 CPU minutes). Stage i downsamples by `strides[i]` (a strided
    conv whose kernel is the stride, 3x3 when the stride is 1) and widens to `channels[i]`,
    then runs `blocks_per_stage` residual 3x3 blocks. The last stage's map is the
    `[B, S*S, hidden_size]` grid the projector and region sampler read, S = image_size /
    prod(strides).

    `position_embedding` adds a learned per-cell vector (started as a 2D sine-cosine code) to that
    grid. Convolutions are translation-equivariant and the LLM's rotary positions act only on
    queries and keys, so without it an image token's value says what is there but not where: a
    head that attends to the right object copies no location, and boxes cannot be read out.
    """

    model_type = "ferret_conv_vision"

    def __init__(self, image_size: int = 144, channels=(48, 96, 160), strides=(4, 3, 1),
                 blocks_per_stage: int = 1, norm_groups: int = 8, position_embedding: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.position_embedding = bool(position_embedding)
        self.image_size = int(image_size)
        self.channels = [int(c) for c in channels]
        self.strides = [int(s) for s in strides]
        self.blocks_per_stage = int(blocks_per_stage)
        self.norm_groups = int(norm_groups)
        if len(self.channels) != len(self.strides) or not self.channels or min(self.strides) < 1:
            raise ValueError(f"conv tower: channels {self.channels} and strides {self.strides} need one entry "
                             "per stage, strides >= 1")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"conv tower: every width in {self.channels} must divide into {self.norm_groups} norm groups")
        if self.image_size % math.prod(self.strides):
            raise ValueError(f"conv tower: image_size {self.image_size} is not a multiple of the total stride "
                             f"{math.prod(self.strides)}")

    @property
    def hidden_size(self) -> int:
        return self.channels[-1]

    @property
    def grid_size(self) -> int:
        return self.image_size // math.prod(self.strides)


def _conv_norm_act(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    kernel, padding = (3, 1) if stride == 1 else (stride, 0)  # strided: non-overlapping cells
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.GroupNorm(groups, c_out), nn.GELU())


def sincos_grid_code(grid: int, channels: int) -> torch.Tensor:
    """[grid*grid, channels] row-major: sines and cosines of the cell's row and column at
    geometric frequencies (a quarter of the channels each), zero-padded to `channels`."""
    quarter = channels // 4
    freqs = (2.0 * grid) ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))  # 1 .. 2*grid half-turns
    centers = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    angles = math.pi * centers[:, None] * freqs[None, :]
    rows = torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid, 2*quarter]
    code = torch.cat([rows[:, None, :].expand(grid, grid, -1), rows[None, :, :].expand(grid, grid, -1)], dim=2)
    code = code.reshape(grid * grid, 4 * quarter)
    return torch.nn.functional.pad(code, (0, channels - 4 * quarter))


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(_conv_norm_act(channels, channels, 1, groups),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.GroupNorm(groups, channels))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class ConvVisionTower(nn.Module):
    """The conv tower with FerretVisionTower's interface (`hidden_size`, `grid_size`,
    `num_patches`, `forward` -> [B, S*S, C] row-major).

    It always computes in fp32, whatever dtype its weights are stored in: bf16 convolutions on
    CPU are 15x slower than fp32 ones here (oneDNN has no fast bf16 conv path on this CPU), and
    the tower is small, so a bf16 run casts its weights up on the fly (a differentiable cast: the
    gradients reach the stored weights) and its output back down."""

    def __init__(self, config: ConvVisionConfig, frozen: bool = True):
        super().__init__()
        self._config = config
        stages, c_in = [], 3
        for c_out, stride in zip(config.channels, config.strides):
            layers = [_conv_norm_act(c_in, c_out, stride, config.norm_groups)]
            layers += [_ResidualBlock(c_out, config.norm_groups) for _ in range(config.blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.position_embedding = (nn.Parameter(sincos_grid_code(config.grid_size, config.hidden_size))
                                   if config.position_embedding else None)
        self.requires_grad_(not frozen)
        # Keep PyTorch's fan-in scaled init: the Hugging Face post_init would redraw every conv
        # N(0, initializer_range), and a tower trained from scratch learns its shapes slower so
        # (tower probe: 0.57 against 0.64 object-level shape after 400 steps; bench/probes/README.md).
        for module in self.modules():
            module._is_hf_initialized = True

    @property
    def config(self) -> ConvVisionConfig:
        return self._config

    @property
    def hidden_size(self) -> int:
        return self._config.hidden_size

    @property
    def grid_size(self) -> int:
        return self._config.grid_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def dtype(self) -> torch.dtype:
        return self.stages[0][0][0].weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_shape(pixel_values, self._config.image_size)
        stored = self.dtype
        device = self.stages[0][0][0].weight.device
        with torch.autocast(device.type, enabled=False):
            if stored == torch.float32:
                maps = self.stages(pixel_values.to(device=device, dtype=torch.float32))
            else:
                weights = {name: p.float() for name, p in self.stages.named_parameters()}
                maps = torch.func.functional_call(self.stages, weights, (pixel_values.to(device=device, dtype=torch.float32),))
            tokens = maps.flatten(2).transpose(1, 2)
            if self.position_embedding is not None:
                tokens = tokens + self.position_embedding.float()
        return tokens.to(stored)


def build_vision_tower(vision_config, select_layer: int = -2, select_feature: str = "patch", frozen: bool = True) -> nn.Module:
    """The tower a config describes: the conv tower for a ConvVisionConfig, else the CLIP ViT."""
    if isinstance(vision_config, ConvVisionConfig):
        return ConvVisionTower(vision_config, frozen=frozen)
    return FerretVisionTower(vision_config, select_layer=select_layer, select_feature=select_feature, frozen=frozen)
