"""The CLIP vision tower, wrapped so that its state-dict names match the released checkpoints.

The released code wraps `CLIPVisionModel` in a module whose attribute is `vision_tower`, so the
weights live under `model.vision_tower.vision_tower.vision_model.*`. transformers 5 flattened
`CLIPVisionModel` (its names lost the `vision_model.` level), so `ClipVisionHolder` puts that level
back: the state-dict names stay those of the released (transformers 4.x) checkpoints.
The tower is built from its config only (never from the hub); weights come either from the
Ferret checkpoint that contains them or from `load_clip_weights(local_folder)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel


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
        expected = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (expected, expected):
            raise ValueError(
                f"images must be shaped [B, 3, {expected}, {expected}] for this vision tower, "
                f"got {list(pixel_values.shape)}"
            )
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
