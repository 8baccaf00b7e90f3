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
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaPreTrainedModel

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ferret.model.configuration_ferret import FerretConfig
from ferret.model.multimodal_inputs import MultimodalInputs, splice_multimodal_embeddings
from ferret.model.region_adapter import MaskPoolingRegionAdapter
from ferret.model.vision_tower import ConvVisionTower, FerretVisionTower, build_vision_tower

RegionMasks = Sequence[Sequence[torch.Tensor]]

# FerretModel's multimodal modules, by attribute (and state-dict) name; a model holds one of the
# two region modules (`FerretModel.region_module`).
MULTIMODAL_MODULES = ("vision_tower", "mm_projector", "region_geo_sampler", "region_fea_adapter")

# Modules kept unquantized when the LLM is loaded in 8/4 bit (bitsandbytes skip list). transformers
# matches these as name prefixes (or suffixes), so they are written from the model root.
FULL_PRECISION_MODULES = [f"model.{name}" for name in MULTIMODAL_MODULES] + ["lm_head"]


class RegionModule(Protocol):
    """What both region modules (GeoRegionSampler, MaskPoolingRegionAdapter) are called with: CLIP
    maps [B, S*S, mm_hidden] and B lists of (W, H) bool masks -> B entries, [R_i, hidden] or None."""

    def __call__(self, feature_maps: torch.Tensor, region_masks: RegionMasks,
                 generator: torch.Generator | None = None) -> list[torch.Tensor | None]: ...


class GradientCover(Protocol):
    """Work a training forward adds so that every trainable weight gets a gradient (DeepSpeed);
    installed by the trainer, see ferret.training.gradient_cover."""

    def region_masks(self, model: "FerretLlamaForCausalLM", per_image: list[list[torch.Tensor]],
                     device: torch.device) -> list[list[torch.Tensor]]: ...

    def touch(self, model: "FerretLlamaForCausalLM", inputs_embeds: torch.Tensor,
              region_outputs: Sequence[torch.Tensor | None], ran_image: bool) -> torch.Tensor: ...


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

    @property
    def region_module(self) -> RegionModule | None:
        """The configured region module (`region_geo_sampler` or `region_fea_adapter`), or None
        for a text-only model."""
        if not self.config.is_multimodal:
            return None
        return self.region_geo_sampler if self.config.region_geo_sampler else self.region_fea_adapter

    def multimodal_modules(self) -> list[nn.Module]:
        """The vision tower, projector and region module this model holds."""
        return [getattr(self, name) for name in MULTIMODAL_MODULES if hasattr(self, name)]


class FerretLlamaForCausalLM(LlamaForCausalLM):
    config_class = FerretConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "GeoRegionSampler"]
    # Buffers that older checkpoints stored (CLIP position ids, LLaMA rotary frequencies); both
    # are recomputed now.
    _keys_to_ignore_on_load_unexpected = [
        r"vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids",
        r"rotary_emb\.inv_freq",
    ]

    # Set by the trainer (ferret.training.gradient_cover.install_gradient_cover) to make its
    # training forwards touch every trainable weight. Without it a training forward computes
    # exactly what an inference forward does.
    gradient_cover: GradientCover | None = None

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
        module = self.model.region_module
        if module is None:
            raise ValueError("this Ferret model has no region module; it cannot take region masks")
        dtype = next(module.parameters()).dtype
        # In the module's own dtype, never autocast: under bf16 autocast the sampled points' positions
        # and their encodings keep 8 bits, and a model trained so named points 0.81 at fp32 inference
        # (0.87 with the module under autocast again; session 39).
        with torch.autocast(feature_maps.device.type, enabled=False):
            return module(feature_maps.to(dtype), region_masks, generator=generator)

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

        cover = self._active_gradient_cover()
        region_outputs: list[torch.Tensor | None] = []
        if image_samples:
            features, projected = self.encode_images(self._images_for(images, batch, image_samples))
            for row, sample in enumerate(image_samples):
                image_embeds[sample] = projected[row]
            per_image = [list(region_masks[i]) if i in region_samples else [] for i in image_samples]
            if cover is not None:
                per_image = cover.region_masks(self, per_image, features.device)
            rows = [row for row, masks in enumerate(per_image) if masks]
            if rows:
                tower = self.get_vision_tower()
                grid = features[:, -tower.num_patches :]  # drop CLS if the config kept it
                if isinstance(generator, (list, tuple)):
                    # One generator per sample: each sample's region sampling is then independent
                    # of what else is in the batch (batched answers == one-by-one answers).
                    if len(generator) != batch:
                        raise ValueError(f"{len(generator)} region generators for a batch of {batch}")
                    region_outputs = [
                        self.encode_regions(grid[row : row + 1], [per_image[row]], generator[image_samples[row]])[0]
                        for row in rows
                    ]
                else:
                    region_outputs = self.encode_regions(grid[rows], [per_image[row] for row in rows], generator)
                for row, feats in zip(rows, region_outputs):
                    if image_samples[row] in region_samples:
                        region_embeds[image_samples[row]] = feats

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
        if cover is not None:
            merged.inputs_embeds = cover.touch(self, merged.inputs_embeds, region_outputs, bool(image_samples))
        return merged

    def _active_gradient_cover(self) -> GradientCover | None:
        """The installed gradient cover in a training forward (train mode, gradients on), else None."""
        if self.gradient_cover is None or not (self.training and torch.is_grad_enabled()):
            return None
        return self.gradient_cover

    @staticmethod
    def _images_for(images: torch.Tensor | None, batch: int, image_samples: list[int]) -> torch.Tensor:
        """The images of the samples that hold an image token: one image per sample or one per token."""
        if images is None:
            raise ValueError("input_ids contain the image token but no images were given")
        if images.shape[0] == batch:
            return images[image_samples]
        if images.shape[0] == len(image_samples):
            return images
        raise ValueError(
            f"got {images.shape[0]} images for {batch} samples of which {len(image_samples)} hold an "
            "image token; give one image per sample or one per image token"
        )

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
        logits_at_labels: bool = False,
        **kwargs,
    ):
        """`logits_at_labels=True` (training; needs `labels`): the LM head runs only at the positions
        whose next token is labelled, and `logits` is [N, vocab] for those N positions in row-major
        order. The loss is the same mean cross-entropy; the head and its backward skip the prompt
        and the image tokens (most of the sequence)."""
        if logits_at_labels and labels is None:
            raise ValueError("logits_at_labels=True needs labels")
        # (a covered training step splices text-only batches too: the cover touches the multimodal weights)
        covered_step = self._active_gradient_cover() is not None and self.get_vision_tower() is not None
        needs_splice = input_ids is not None and (
            images is not None or region_masks is not None or covered_step or bool((input_ids < 0).any())
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
        if logits_at_labels:
            return self._labelled_forward(input_ids, attention_mask, position_ids, inputs_embeds, labels, **kwargs)
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

    def _labelled_forward(self, input_ids, attention_mask, position_ids, inputs_embeds, labels, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state
        # Position t predicts label t+1, as in transformers' causal-LM loss.
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[keep])
        loss = F.cross_entropy(logits.float(), targets[keep], ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

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
