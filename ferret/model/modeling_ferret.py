"""Ferret: LLaMA + CLIP vision tower + projector + region sampler, with released state-dict names.

Inputs follow the released convention: `input_ids` hold IMAGE_TOKEN_INDEX (-200) once per sample
where the image goes and the `<region_fea>` id (config.im_region_fea_token) once per referred
region; `images` is [B or #samples-with-image, 3, S, S]; `region_masks` is a per-sample list of
(W, H) bool masks (official layout), one per `<region_fea>` token in order.

`prepare_multimodal_inputs` encodes the image and regions and hands them to
`multimodal_inputs.splice_multimodal_embeddings`, which builds `inputs_embeds`, attention mask,
position ids and labels for a padded batch. `forward` runs it then the LLaMA
decoder; `generate` runs it once (left padded) and decodes with the KV cache, so the image and
the regions only enter the prefill step. `generate` returns only the new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaPreTrainedModel

from ferret.constants import IMAGE_TOKEN_INDEX
from ferret.model.configuration_ferret import FerretConfig
from ferret.model.multimodal_inputs import MultimodalInputs, splice_multimodal_embeddings
from ferret.model.region_adapter import MaskPoolingRegionAdapter
from ferret.model.vision_tower import ConvVisionTower, FerretVisionTower, build_vision_tower

RegionMasks = Sequence[Sequence[torch.Tensor]]

# Modules kept unquantized when the LLM is loaded in 8/4 bit (bitsandbytes skip list). transformers
# matches these as name prefixes (or suffixes), so they are written from the model root.
FULL_PRECISION_MODULES = [
    "model.vision_tower",
    "model.mm_projector",
    "model.region_geo_sampler",
    "model.region_fea_adapter",
    "lm_head",
]


def _zero_touch(modules: Sequence[nn.Module]) -> torch.Tensor:
    """0 * (sum of the trainable weights): every trainable parameter then gets a (zero) gradient
    on every step, which DDP and DeepSpeed ZeRO need when a batch skips the image or regions."""
    total = None
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                term = parameter.sum()
                total = term if total is None else total + term.to(total.dtype)
    return torch.zeros(()) if total is None else total * 0.0


# --------------------------------------------------------------------------- modules


def _build_region_sampler(config: FerretConfig) -> nn.Module:
    from ferret.model.sampler import GeoRegionSampler

    return GeoRegionSampler(
        input_dim=config.mm_hidden_size,
        output_dim=config.hidden_size,
        num_init_point=config.sampler_num_init_point,
        num_sub_point=tuple(config.sampler_num_sub_point),
        num_neighbor=tuple(config.sampler_num_neighbor),
        pooler_mode=config.sampler_pooler_mode,
        feature_layout=config.feature_layout,
    )


class FerretModel(LlamaModel):
    """LlamaModel plus `vision_tower`, `mm_projector` and `region_geo_sampler` / `region_fea_adapter`."""

    config_class = FerretConfig

    def __init__(self, config: FerretConfig):
        super().__init__(config)
        if config.is_multimodal:
            self.vision_tower = build_vision_tower(
                config.vision_tower_config(),
                select_layer=config.mm_vision_select_layer,
                select_feature=config.mm_vision_select_feature,
            )
            self.mm_projector = nn.Linear(config.mm_hidden_size, config.hidden_size)
            if config.region_geo_sampler:
                self.region_geo_sampler = _build_region_sampler(config)
            else:
                self.region_fea_adapter = MaskPoolingRegionAdapter(
                    config.mm_hidden_size,
                    config.hidden_size,
                    num_points=config.sampler_num_init_point,
                    feature_layout=config.feature_layout,
                )
        self.post_init()


class FerretLlamaForCausalLM(LlamaForCausalLM):
    config_class = FerretConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "GeoRegionSampler"]
    # Buffers that older checkpoints stored (CLIP position ids, LLaMA rotary frequencies); both
    # are recomputed now.
    _keys_to_ignore_on_load_unexpected = [
        r"vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids",
        r"rotary_emb\.inv_freq",
    ]

    def __init__(self, config: FerretConfig):
        # Skip LlamaForCausalLM.__init__ (it would build a plain LlamaModel first).
        LlamaPreTrainedModel.__init__(self, config)
        self.model = FerretModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading materialises fresh Parameters (requires_grad True); re-freeze the tower so a
        # loaded model trains like a constructed one.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        tower = model.get_vision_tower()
        if tower is not None:
            tower.requires_grad_(False)
        return loaded

    # ----------------------------------------------------------------- parts

    def get_vision_tower(self) -> FerretVisionTower | ConvVisionTower | None:
        return getattr(self.model, "vision_tower", None)

    @property
    def region_token_id(self) -> int | None:
        return self.config.im_region_fea_token

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] -> (CLIP features [B, N, mm_hidden], projected embeddings [B, N, hidden])."""
        tower = self.get_vision_tower()
        if tower is None:
            raise ValueError("this Ferret model has no vision tower (config has no mm_vision_tower/vision_config)")
        features = tower(images)
        projector_dtype = self.model.mm_projector.weight.dtype
        projected = self.model.mm_projector(features.to(projector_dtype))
        return features, projected

    def encode_regions(
        self, feature_maps: torch.Tensor, region_masks: RegionMasks, generator: torch.Generator | None = None
    ) -> list[torch.Tensor | None]:
        """Per-image region features [R_i, hidden] (or None) from CLIP maps [B, S*S, mm_hidden]."""
        if getattr(self.model, "region_geo_sampler", None) is not None:
            sampler = self.model.region_geo_sampler
            dtype = next(sampler.parameters()).dtype
            return sampler(feature_maps.to(dtype), region_masks, generator=generator)
        adapter = getattr(self.model, "region_fea_adapter", None)
        if adapter is None:
            raise ValueError("this Ferret model has no region module; it cannot take region masks")
        return adapter.region_features(feature_maps.to(adapter.weight.dtype), region_masks, generator=generator)

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        region_masks: RegionMasks | None = None,
        padding_side: str = "right",
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    ) -> MultimodalInputs:
        """Embed a batch: see the module docstring. `generator` drives the region sampler's random
        draws: one for the whole batch, or a list with one per sample."""
        batch = input_ids.shape[0]
        has_image = (input_ids == IMAGE_TOKEN_INDEX)
        if attention_mask is not None:
            has_image = has_image & attention_mask.bool()
        image_samples = [i for i in range(batch) if bool(has_image[i].any())]
        image_embeds: list[torch.Tensor | None] = [None] * batch
        region_embeds: list[torch.Tensor | None] = [None] * batch

        if region_masks is not None and len(region_masks) != batch:
            raise ValueError(f"region_masks has {len(region_masks)} entries for a batch of {batch}")
        region_samples = [i for i in range(batch) if region_masks is not None and len(region_masks[i]) > 0]
        if region_samples and self.region_token_id is None:
            raise ValueError("region masks given but the config has no im_region_fea_token")
        for i in region_samples:
            if i not in image_samples:
                raise ValueError(f"sample {i} has region masks but no image token: regions need an image")

        if image_samples:
            if images is None:
                raise ValueError("input_ids contain the image token but no images were given")
            if images.shape[0] == batch:
                selected = images[image_samples]
            elif images.shape[0] == len(image_samples):
                selected = images
            else:
                raise ValueError(
                    f"got {images.shape[0]} images for {batch} samples of which {len(image_samples)} hold an "
                    "image token; give one image per sample or one per image token"
                )
            features, projected = self.encode_images(selected)
            for row, sample in enumerate(image_samples):
                image_embeds[sample] = projected[row]
            region_module_trains = self.training and torch.is_grad_enabled() and self._region_module_trains()
            if region_samples or region_module_trains:
                tower = self.get_vision_tower()
                grid = features[:, -tower.num_patches :]  # drop CLS if the config kept it
                if region_module_trains:
                    # A training step runs the region module on every image (a placeholder mask
                    # where an image refers to no region) and adds 0 x all its outputs below: every
                    # rank then runs the same modules in the same order and every weight gets a
                    # gradient, whatever the batch holds. DeepSpeed needs both: ZeRO-2 reduces from
                    # per-parameter hooks, ZeRO-3 replays the gather order it recorded at step 1.
                    placeholder = torch.ones(4, 4, dtype=torch.bool, device=grid.device)
                    targets = image_samples
                    masks = [list(region_masks[i]) if i in region_samples else [placeholder] for i in targets]
                    rows = list(range(len(image_samples)))
                else:
                    targets = region_samples
                    masks = [region_masks[i] for i in region_samples]
                    rows = [image_samples.index(i) for i in region_samples]
                if isinstance(generator, (list, tuple)):
                    # One generator per sample: each sample's region sampling is then independent
                    # of what else is in the batch (batched answers == one-by-one answers).
                    if len(generator) != batch:
                        raise ValueError(f"{len(generator)} region generators for a batch of {batch}")
                    sampled = [
                        self.encode_regions(grid[row : row + 1], [sample_masks], generator[i])[0]
                        for row, sample_masks, i in zip(rows, masks, targets)
                    ]
                else:
                    sampled = self.encode_regions(grid[rows], masks, generator)
                for sample, feats in zip(targets, sampled):
                    if sample in region_samples:
                        region_embeds[sample] = feats
                if region_module_trains:
                    anchor = sum(feats.sum() for feats in sampled if feats is not None) * 0.0
                    image_embeds = [e if e is None else e + anchor.to(e.dtype) for e in image_embeds]

        merged = splice_multimodal_embeddings(
            input_ids,
            attention_mask,
            labels,
            self.get_input_embeddings(),
            image_embeds,
            region_embeds,
            self.region_token_id,
            padding_side=padding_side,
        )
        if self.training and torch.is_grad_enabled():
            # (With an image, the region module already ran above.)
            unused = self._unused_trainable_modules(bool(image_samples), bool(image_samples) or bool(region_samples))
            if unused:
                merged.inputs_embeds = merged.inputs_embeds + _zero_touch(unused).to(merged.inputs_embeds.dtype)
        return merged

    def _region_module_trains(self) -> bool:
        module = getattr(self.model, "region_geo_sampler", None) or getattr(self.model, "region_fea_adapter", None)
        return module is not None and any(p.requires_grad for p in module.parameters())

    def _unused_trainable_modules(self, used_image: bool, used_regions: bool) -> list[nn.Module]:
        """Multimodal modules this batch did not run (text-only batch, or no regions)."""
        names = []
        if not used_image:
            names += ["mm_projector", "vision_tower"]
        if not used_regions:
            names += ["region_geo_sampler", "region_fea_adapter"]
        return [m for m in (getattr(self.model, n, None) for n in names) if m is not None]

    # ----------------------------------------------------------------- forward / generate

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        images: torch.Tensor | None = None,
        region_masks: RegionMasks | None = None,
        region_generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        **kwargs,
    ):
        training_step = self.training and torch.is_grad_enabled() and self.get_vision_tower() is not None
        needs_splice = input_ids is not None and (
            images is not None or region_masks is not None or training_step or bool((input_ids < 0).any())
        )
        if needs_splice:
            if inputs_embeds is not None:
                raise ValueError("pass either input_ids (with images/regions) or inputs_embeds, not both")
            past = cache if cache is not None else kwargs.get("past_key_values")
            if past is not None and past.get_seq_length() > 0:
                raise ValueError("images and regions can only be given in the prefill step (empty cache)")
            merged = self.prepare_multimodal_inputs(
                input_ids, attention_mask, labels, images, region_masks, generator=region_generator
            )
            input_ids, inputs_embeds = None, merged.inputs_embeds
            attention_mask, position_ids, labels = merged.attention_mask, merged.position_ids, merged.labels
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        region_masks: RegionMasks | None = None,
        region_generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
        **kwargs,
    ):
        """Decode with the KV cache; returns only the new tokens [B, T].

        The prompt (image and regions included) is embedded once, left padded, and handed to the
        standard generation loop as `inputs_embeds`, so later steps see only the cache.
        """
        if input_ids is None:
            return super().generate(attention_mask=attention_mask, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pass either input_ids (with images/regions) or inputs_embeds, not both")
        if kwargs.get("use_cache") is False:
            raise ValueError("Ferret generation embeds the prompt once and needs use_cache=True")
        merged = self.prepare_multimodal_inputs(
            input_ids, attention_mask, None, images, region_masks, padding_side="left", generator=region_generator
        )
        return super().generate(
            inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, **kwargs
        )


AutoModelForCausalLM.register(FerretConfig, FerretLlamaForCausalLM, exist_ok=True)
