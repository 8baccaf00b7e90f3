"""`FerretConfig`: a LLaMA config plus the multimodal fields of the released Ferret checkpoints.

Released `config.json` files (model_type "ferret") carry `mm_vision_tower`, `mm_hidden_size`,
`mm_vision_select_layer`, `mm_vision_select_feature`, `region_geo_sampler`,
`sampler_pooler_mode`, `im_region_fea_token`, `mm_use_im_start_end` and
`mm_use_im_patch_token`. We add:

* `feature_layout`: "official" reproduces the released sampler's transposed feature lookup and is
  the default whenever a config lacks the field (every released config); new models should pass
  "aligned" (see `ferret.model.tiny` and the training entry point).
* `vision_config`: an optional embedded CLIPVisionConfig dict, so that a model's own vision tower
  can be built from the config alone with no hub access; with `model_type: ferret_conv_vision`
  it describes the small conv tower of models trained from scratch (`ConvVisionConfig`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoProcessor, CLIPVisionConfig, LlamaConfig, PreTrainedConfig

from ferret.model.vision_tower import ConvVisionConfig
from ferret_kernels.params import FEATURE_LAYOUTS, POOLER_MODES, SamplerGeometry
from ferret.processing import FerretProcessor

CONV_TOWER_TYPE = ConvVisionConfig.model_type
CONV_TOWER_FIELDS = ("image_size", "channels", "strides", "blocks_per_stage", "norm_groups", "position_embedding")

SELECT_FEATURES = ("patch", "cls_patch")

# Hub names of vision towers whose shapes we know, so a config naming them builds offline (the
# weights then come from the Ferret checkpoint itself). Values are CLIPVisionConfig kwargs.
KNOWN_VISION_TOWERS: dict[str, dict] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768,
    ),
}


class FerretConfigError(ValueError):
    """A Ferret config is inconsistent or names something we cannot build."""


@strict
class FerretConfig(LlamaConfig):
    model_type = "ferret"

    mm_vision_tower: str | None = None
    mm_hidden_size: int = 1024
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    region_geo_sampler: bool = True
    sampler_pooler_mode: str = "max"
    im_region_fea_token: int | None = None
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    feature_layout: str = "official"
    vision_config: dict | PreTrainedConfig | None = None
    # GeoRegionSampler geometry (the released models use these values; kept configurable so that
    # tiny test models stay cheap).
    sampler_num_init_point: int = 512
    sampler_num_sub_point: list[int] | tuple[int, ...] = SamplerGeometry.num_sub_point
    sampler_num_neighbor: list[int] | tuple[int, ...] = SamplerGeometry.num_neighbor

    def __post_init__(self, **kwargs):
        if self.vision_config is not None:
            self.vision_config = _normalise_vision_config(self.vision_config)
        self.sampler_num_sub_point = list(self.sampler_num_sub_point)
        self.sampler_num_neighbor = list(self.sampler_num_neighbor)
        _check_choice("feature_layout", self.feature_layout, FEATURE_LAYOUTS)
        _check_choice("sampler_pooler_mode", self.sampler_pooler_mode, POOLER_MODES)
        _check_choice("mm_vision_select_feature", self.mm_vision_select_feature, SELECT_FEATURES)
        for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if getattr(self, flag):
                # The released Ferret models set both to false; the image start/end and patch
                # tokens are a LLaVA pre-training variant this implementation does not build.
                raise FerretConfigError(f"{flag}=True is not supported (released Ferret models use false)")
        if len(self.sampler_num_sub_point) != len(self.sampler_num_neighbor):
            raise FerretConfigError(
                "sampler_num_sub_point and sampler_num_neighbor must have one entry per stage, got "
                f"{self.sampler_num_sub_point} and {self.sampler_num_neighbor}"
            )
        super().__post_init__(**kwargs)
        if self.is_multimodal:
            vision = self.vision_tower_config()
            if vision.hidden_size != self.mm_hidden_size:
                raise FerretConfigError(
                    f"mm_hidden_size={self.mm_hidden_size} does not match the vision tower's "
                    f"hidden_size={vision.hidden_size}"
                )

    @property
    def is_multimodal(self) -> bool:
        return self.mm_vision_tower is not None or self.vision_config is not None

    def vision_tower_config(self) -> CLIPVisionConfig | ConvVisionConfig:
        """The tower's config, resolved without any network access: a ConvVisionConfig when the
        embedded `vision_config` says `model_type: ferret_conv_vision`, else a CLIPVisionConfig.

        Order: the embedded `vision_config`; a known hub name; a local folder's config.json.
        """
        if self.vision_config is not None:
            if self.vision_config.get("model_type") == CONV_TOWER_TYPE:
                return ConvVisionConfig(**{k: v for k, v in self.vision_config.items() if k != "model_type"})
            return CLIPVisionConfig(**self.vision_config)
        name = self.mm_vision_tower
        if name is None:
            raise FerretConfigError("this Ferret config has neither mm_vision_tower nor vision_config")
        if name in KNOWN_VISION_TOWERS:
            return CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])
        from pathlib import Path

        folder = Path(name)
        if (folder / "config.json").is_file():
            # A full CLIPConfig folder or a CLIPVisionConfig folder both work here.
            return CLIPVisionConfig.from_pretrained(str(folder))
        raise FerretConfigError(
            f"mm_vision_tower {name!r} is neither a known vision tower "
            f"({', '.join(KNOWN_VISION_TOWERS)}) nor a local folder with a config.json; "
            "embed a `vision_config` in the Ferret config to build it offline"
        )


def _normalise_vision_config(vision_config: dict | PreTrainedConfig) -> dict:
    """A JSON-stable dict of the tower config: the conv tower's own fields (with its model_type),
    or the CLIPVisionConfig fields that differ from the defaults."""
    if isinstance(vision_config, PreTrainedConfig):
        vision_config = vision_config.to_dict()
    if vision_config.get("model_type") == CONV_TOWER_TYPE:
        fields = {k: vision_config[k] for k in CONV_TOWER_FIELDS if k in vision_config}
        try:
            conv = ConvVisionConfig(**fields)
        except (TypeError, ValueError) as error:
            raise FerretConfigError(f"vision_config is not a valid conv tower config: {error}") from None
        return {"model_type": CONV_TOWER_TYPE, **{k: getattr(conv, k) for k in CONV_TOWER_FIELDS}}
    fields = {k: v for k, v in vision_config.items() if k not in ("model_type", "transformers_version")}
    try:
        config = CLIPVisionConfig(**fields)
    except Exception as error:  # strict-dataclass errors are not ValueErrors
        raise FerretConfigError(f"vision_config is not a valid CLIPVisionConfig: {error}") from None
    diff = config.to_diff_dict()
    for key in ("model_type", "transformers_version"):
        diff.pop(key, None)
    return diff


def _check_choice(field: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FerretConfigError(f"{field} must be one of {choices}, got {value!r}")


AutoConfig.register("ferret", FerretConfig, exist_ok=True)
# AutoProcessor.from_pretrained(a Ferret folder) -> FerretProcessor (via processor_config.json or this config).
AutoProcessor.register(FerretConfig, FerretProcessor, exist_ok=True)
