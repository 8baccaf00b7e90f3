"""Splicing image and region embeddings into a padded text batch (pure functions, no model).

`input_ids` hold IMAGE_TOKEN_INDEX once where a sample's image goes and the `<region_fea>` id once
per referred region. The image placeholder is replaced by the N rows of projected patch
embeddings (labels there become IGNORE_INDEX); each region token's embedding row is replaced by
its region feature. Input padding (attention_mask 0, either side) is dropped and rebuilt on the
requested side, with position ids counting real tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN


class RegionTokenMismatchError(ValueError):
    """The number of `<region_fea>` tokens in a sample differs from the number of its region masks."""


@dataclass
class MultimodalInputs:
    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L] long, 1 = real token
    position_ids: torch.Tensor  # [B, L], 0..n-1 over real tokens, 0 on padding
    labels: torch.Tensor | None  # [B, L], IGNORE_INDEX on image / padding positions


def splice_multimodal_embeddings(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    image_embeds: Sequence[torch.Tensor | None],
    region_embeds: Sequence[torch.Tensor | None],
    region_token_id: int | None,
    padding_side: str = "right",
) -> MultimodalInputs:
    """Build the padded embedding batch: image rows at IMAGE_TOKEN_INDEX, region rows at region tokens.

    `image_embeds[i]` ([N, D]) is required iff sample i holds IMAGE_TOKEN_INDEX (exactly once);
    `region_embeds[i]` ([R_i, D]) must have one row per region token of sample i (None for none).
    Padding in the input (attention_mask 0, either side) is dropped and rebuilt on `padding_side`.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    batch = input_ids.shape[0]
    if len(image_embeds) != batch or len(region_embeds) != batch:
        raise ValueError(
            f"{batch} samples but {len(image_embeds)} image entries and {len(region_embeds)} region entries"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {list(labels.shape)} != input_ids shape {list(input_ids.shape)}")

    sequences: list[torch.Tensor] = []
    sequence_labels: list[torch.Tensor] = []
    for index in range(batch):
        keep = attention_mask[index].bool()
        ids = input_ids[index][keep]
        sample_labels = labels[index][keep] if labels is not None else None
        image_positions = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        region_positions = (
            (ids == region_token_id).nonzero().flatten() if region_token_id is not None else ids.new_zeros(0)
        )
        regions = region_embeds[index]
        num_regions = 0 if regions is None else regions.shape[0]
        if region_positions.numel() != num_regions:
            raise RegionTokenMismatchError(
                f"sample {index} has {region_positions.numel()} {REGION_TOKEN} token(s) but "
                f"{num_regions} region feature(s) (one region mask per token is required)"
            )
        embeds = embed_tokens(ids.clamp(min=0))
        if num_regions:
            embeds = embeds.index_put((region_positions,), regions.to(embeds.dtype))
        if image_positions.numel() > 1:
            raise ValueError(f"sample {index} holds {image_positions.numel()} image tokens; Ferret takes one image")
        if image_positions.numel() == 1:
            image = image_embeds[index]
            if image is None:
                raise ValueError(f"sample {index} holds an image token but no image was given for it")
            at = int(image_positions[0])
            embeds = torch.cat([embeds[:at], image.to(embeds.dtype), embeds[at + 1 :]], dim=0)
            if sample_labels is not None:
                ignored = sample_labels.new_full((image.shape[0],), IGNORE_INDEX)
                sample_labels = torch.cat([sample_labels[:at], ignored, sample_labels[at + 1 :]])
        sequences.append(embeds)
        if sample_labels is not None:
            sequence_labels.append(sample_labels)

    # The batch keeps the input's padded width (plus the image rows): a collator that pads to a
    # multiple of some length then gives the LLM few distinct shapes (on CPU, each new bf16 shape
    # builds and caches new oneDNN kernels). Without extra input padding this is the longest row.
    image_rows = max((e.shape[0] - 1 for e in image_embeds if e is not None), default=0)
    return _pad_batch(sequences, sequence_labels if labels is not None else None, padding_side,
                      min_length=input_ids.shape[1] + image_rows)


def _pad_batch(
    sequences: list[torch.Tensor], labels: list[torch.Tensor] | None, padding_side: str, min_length: int = 0
) -> MultimodalInputs:
    longest = max(min_length, max(seq.shape[0] for seq in sequences))
    reference = sequences[0]
    batch = len(sequences)
    mask = torch.zeros((batch, longest), dtype=torch.long, device=reference.device)
    positions = torch.zeros((batch, longest), dtype=torch.long, device=reference.device)
    padded_labels = None
    if labels is not None:
        padded_labels = torch.full((batch, longest), IGNORE_INDEX, dtype=labels[0].dtype, device=labels[0].device)
    rows = []
    for index, seq in enumerate(sequences):
        length = seq.shape[0]
        span = slice(0, length) if padding_side == "right" else slice(longest - length, longest)
        rows.append(seq if length == longest else _pad_rows(seq, longest, padding_side))
        mask[index, span] = 1
        positions[index, span] = torch.arange(length, device=reference.device)
        if padded_labels is not None:
            padded_labels[index, span] = labels[index]
    # Stacking (rather than writing into `embeds` in place) keeps the graph simple for autograd.
    embeds = torch.stack(rows, dim=0)
    return MultimodalInputs(embeds, mask, positions, padded_labels)


def _pad_rows(seq: torch.Tensor, length: int, padding_side: str) -> torch.Tensor:
    pad = seq.new_zeros((length - seq.shape[0], seq.shape[1]))
    return torch.cat([seq, pad] if padding_side == "right" else [pad, seq], dim=0)
