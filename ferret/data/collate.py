"""Batching of GritDataset items."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from ferret.constants import IGNORE_INDEX


@dataclass
class FerretCollator:
    """Right-pads token sequences, stacks images, keeps region masks as a list per sample.

    The one place where FerretProcessor's samples are padded (training, chat and the processor's
    batch call). Batch keys: input_ids (B, T) padded with `pad_token_id`, labels (B, T) padded
    with IGNORE_INDEX (when every item has labels), attention_mask (B, T) bool (true on real
    tokens, from the lengths, so a pad id that is also a real token id is handled), pixel_values
    (N, 3, S, S): the images of the items that have one, in order, region_masks (list of lists
    of (W, H) bool), image_sizes (list of (W, H) or None),
    skipped (Counter of bad samples the items passed over, by reason; sum it over batches: the
    DataLoader workers' own counts never reach the main process), tasks (when items carry one).
    """

    pad_token_id: int
    max_length: int | None = None
    # Pad every batch to a multiple of this length: few distinct shapes, so the CPU's oneDNN
    # kernels (bf16 on AMX) are built once per shape instead of once per batch.
    pad_to_multiple_of: int = 1

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        if self.pad_token_id is None:
            raise ValueError("FerretCollator needs a pad_token_id (the tokenizer has no pad token)")
        sequences = [item["input_ids"][: self.max_length] for item in items]
        # Labels only when every item has them (a generation prompt has none).
        labelled = all("labels" in item for item in items)
        targets = [item["labels"][: self.max_length] if labelled else seq for item, seq in zip(items, sequences)]
        for seq, tgt in zip(sequences, targets):
            if seq.shape != tgt.shape:
                raise ValueError(f"input_ids and labels differ in length: {tuple(seq.shape)} vs {tuple(tgt.shape)}")
        longest = max(len(seq) for seq in sequences)
        # (rows are already cut to max_length, so rounding up stops there)
        rounded = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        longest = min(rounded, self.max_length or rounded)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.bool)
        for row, (seq, tgt) in enumerate(zip(sequences, targets)):
            input_ids[row, : len(seq)] = seq
            labels[row, : len(tgt)] = tgt
            attention_mask[row, : len(seq)] = True
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "region_masks": [list(item.get("region_masks", [])) for item in items],
            "image_sizes": [item.get("image_size") for item in items],
            "skipped": Counter(reason for item in items for reason in item.get("skipped", ())),
        }
        if not labelled:
            del batch["labels"]
        # The model matches images to the samples holding <image>, in order: a text-only chat
        # request (pixel_values None) adds none. (GritDataset gives text-only samples a blank.)
        images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if images:
            if any(image.shape != images[0].shape for image in images):
                raise ValueError(f"images differ in shape: {sorted({tuple(i.shape) for i in images})}")
            batch["pixel_values"] = torch.stack(images)
        if any("task" in item for item in items):
            batch["tasks"] = [item.get("task") for item in items]
        return batch
