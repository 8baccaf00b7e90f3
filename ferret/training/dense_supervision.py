"""Dense auxiliary supervision of the image tokens, for towers trained from scratch.

The released Ferret starts from a pretrained CLIP, whose patch features already say what is
where. A tower trained from scratch on the language loss alone gets almost no signal through
the LLM, and a small model then learns to answer from the question only. This module gives the
image tokens a direct target, built from the scene records that the synthetic world writes
(`scenes_<split>.json`: every object's colour, shape, box and visible mask):

* per patch of the tower's grid, the object covering most of the patch (background when none
  covers `min_cover` of it): its colour class, its shape class, and its box on Ferret's 0-999
  grid (the numbers the answer writes);
* read out of the *projected* image tokens, the vectors the LLM receives, so no head is added
  and the exported model keeps the plain Ferret architecture: the box regressed in the first 4
  channels (x1, y1, x2, y2 divided by 1000), colour and shape logits in the next ones, and the
  same classes also as projections on the LLM's own word embeddings of the names (" blue",
  " square"; background logit 0), so an image token of a blue square reads, to the LLM, like
  the words "blue square", which it already learns to copy into answers;
* likewise per referred region: the object the region mask overlaps most, read out of the region
  sampler's embedding (the `<region_fea>` input of the LLM).

Loss = CE(colour) + CE(shape) (both readouts) + L1(box) on covered patches, + CE(colour) +
CE(shape) (both readouts) of the regions. (Classifying the box's hundreds and tens digits instead of regressing it was tried: in
30 CPU minutes the tower stayed at chance on the digits and did not learn shapes either.)
Only the training script uses it (`train.dense_loss_weight` > 0 with
`data.scene_records`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


BOX_CHANNELS = 4  # x1, y1, x2, y2 on the 0-999 grid, / 1000


@dataclass(frozen=True)
class DenseVocabulary:
    """Class names of the readout; index 0 of each is the background."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]

    @property
    def num_colors(self) -> int:
        return len(self.colors) + 1

    @property
    def num_shapes(self) -> int:
        return len(self.shapes) + 1

    @property
    def channels(self) -> int:
        """Dedicated channels of the readout (the first ones): box, colour logits, shape logits."""
        return BOX_CHANNELS + self.num_colors + self.num_shapes

    @classmethod
    def synthetic(cls) -> "DenseVocabulary":
        from ferret.data.synthetic import COLORS, SHAPES

        return cls(tuple(COLORS), tuple(SHAPES))


@dataclass
class NameDirections:
    """Unit vectors of the colour [C, hidden] and shape [S, hidden] names in the LLM's input
    word-embedding space: the readout's class weights (detached: the language loss alone moves
    the word embeddings; the vision side aligns to them)."""

    color: torch.Tensor
    shape: torch.Tensor

    @staticmethod
    def token_ids(tokenizer, vocabulary: DenseVocabulary) -> tuple[list[int], list[int]]:
        """The single-token ids of " <colour>" and " <shape>"; a name split in pieces is an error."""
        def ids(names: Sequence[str]) -> list[int]:
            out = []
            for name in names:
                found = tokenizer.encode(" " + name, add_special_tokens=False)
                found = [i for i in found if tokenizer.convert_ids_to_tokens(i) not in ("▁", " ")]
                if len(found) != 1:
                    raise ValueError(f"the readout needs {name!r} to be one token; the tokenizer gives {found}")
                out.append(found[0])
            return out

        return ids(vocabulary.colors), ids(vocabulary.shapes)

    @classmethod
    def from_embeddings(cls, embedding_weight: torch.Tensor, token_ids: tuple[list[int], list[int]]) -> "NameDirections":
        """Directions from the current word embeddings, for `token_ids` (colour ids, shape ids)."""
        weight = embedding_weight.detach()
        return cls(*(F.normalize(weight[list(ids)].float(), dim=-1) for ids in token_ids))

    @classmethod
    def of_module(cls, embeddings: torch.nn.Embedding, token_ids: tuple[list[int], list[int]]) -> "NameDirections":
        """from_embeddings on an embedding module's current weight. The word embeddings move every
        step, so the directions are read afresh, gathered first under ZeRO-3 (which keeps only a
        shard of each weight between forwards)."""
        weight = embeddings.weight
        gathered = contextlib.nullcontext()
        if weight.numel() == 0:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([weight])
        with gathered:
            return cls.from_embeddings(embeddings.weight, token_ids)


def class_logits(vectors: torch.Tensor, directions: NameDirections) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour [..., C+1] and shape [..., S+1] logits of [..., hidden] vectors (index 0: background,
    logit 0; the others: the projection on the name's word embedding)."""
    vectors = vectors.float()
    zero = vectors.new_zeros(vectors.shape[:-1] + (1,))
    color = torch.cat([zero, vectors @ directions.color.to(vectors.device).T], dim=-1)
    shape = torch.cat([zero, vectors @ directions.shape.to(vectors.device).T], dim=-1)
    return color, shape


def patch_coverage(mask_hw: np.ndarray, grid: int) -> np.ndarray:
    """[grid, grid] fraction of each patch covered by the mask, for an image resized straight to a
    square (Ferret's `square_nocrop`): patch (i, j) spans rows i*H/grid..(i+1)*H/grid."""
    if mask_hw.ndim != 2 or mask_hw.shape[0] < 1 or mask_hw.shape[1] < 1:
        raise ValueError(f"patch_coverage needs a 2-D mask, got shape {mask_hw.shape}")
    height, width = mask_hw.shape
    ys = np.rint(np.linspace(0, height, grid + 1)).astype(int)
    xs = np.rint(np.linspace(0, width, grid + 1)).astype(int)
    # Exact pixel counts per cell, summed over row bands then column bands (5x faster than an
    # integral image; it runs for every object of every scene the warm-up and the LLM stage draw).
    # A mask smaller than the grid has empty bands: they count 0 and are left out of reduceat.
    heights, widths = np.diff(ys), np.diff(xs)
    area = np.zeros((grid, grid), dtype=np.int64)
    bands = np.add.reduceat(mask_hw, ys[:-1][heights > 0], axis=0, dtype=np.int64)
    area[np.ix_(heights > 0, widths > 0)] = np.add.reduceat(bands, xs[:-1][widths > 0], axis=1)
    cells = np.outer(heights, widths).astype(np.float64)
    return area / np.maximum(cells, 1.0)


def scene_patch_targets(record: Mapping, grid: int, vocabulary: DenseVocabulary,
                        min_cover: float = 0.2) -> dict[str, torch.Tensor]:
    """Targets for one scene record: colour [grid*grid], shape [grid*grid] (long, 0 = background)
    and box [grid*grid, 4] (long: the patch's object's box on the 0-999 grid, as Ferret writes it
    in answers; zeros on background)."""
    from ferret.data.rle import decode_rle
    from ferret.regions import pixel_to_grid

    width, height = int(record["width"]), int(record["height"])
    cells = grid * grid
    best = np.zeros(cells)
    color = torch.zeros(cells, dtype=torch.long)
    shape = torch.zeros(cells, dtype=torch.long)
    box = torch.zeros(cells, 4, dtype=torch.long)
    for obj in record["objects"]:
        if obj["color"] not in vocabulary.colors or obj["shape"] not in vocabulary.shapes:
            raise ValueError(f"scene {record.get('scene_id')}: object {obj.get('name')!r} is outside the "
                             f"dense vocabulary ({len(vocabulary.colors)} colours, {len(vocabulary.shapes)} shapes)")
        cover = patch_coverage(decode_rle(obj["mask"], (height, width)), grid).reshape(-1)
        wins = (cover >= min_cover) & (cover > best)
        if not wins.any():
            continue
        best[wins] = cover[wins]
        where = torch.from_numpy(np.nonzero(wins)[0])
        color[where] = vocabulary.colors.index(obj["color"]) + 1
        shape[where] = vocabulary.shapes.index(obj["shape"]) + 1
        x1, y1, x2, y2 = obj["box"]
        box[where] = torch.tensor([pixel_to_grid(x1, width), pixel_to_grid(y1, height),
                                   pixel_to_grid(x2, width), pixel_to_grid(y2, height)])
    return {"patch_color": color, "patch_shape": shape, "patch_box": box}


class ScenePatchTargets:
    """scene_id -> patch targets, computed once per scene (the records of a scenes_*.json)."""

    def __init__(self, records: Sequence[Mapping], grid: int, vocabulary: DenseVocabulary | None = None,
                 min_cover: float = 0.2):
        self.records = {int(r["scene_id"]): r for r in records}
        self.grid, self.min_cover = grid, min_cover
        self.vocabulary = vocabulary or DenseVocabulary.synthetic()
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._object_cells: dict[tuple[int, int], torch.Tensor] = {}  # (scene, object) -> its cells

    @classmethod
    def from_file(cls, path: str, grid: int, **kwargs) -> "ScenePatchTargets":
        import json

        with open(path) as handle:
            records = json.load(handle)
        if not isinstance(records, list) or not all(isinstance(r, dict) and "scene_id" in r for r in records):
            raise ValueError(f"{path}: expected a list of scene records with scene_id (a scenes_<split>.json)")
        return cls(records, grid, **kwargs)

    def __contains__(self, scene_id) -> bool:
        return scene_id is not None and int(scene_id) in self.records

    def __getitem__(self, scene_id) -> dict[str, torch.Tensor]:
        key = int(scene_id)
        if key not in self._cache:
            self._cache[key] = scene_patch_targets(self.records[key], self.grid, self.vocabulary, self.min_cover)
        return self._cache[key]

    def answer_box_cells(self, scene_id, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """[len(boxes), grid*grid] bool: the cells covered (>= min_cover, else the single most
        covered cell) by the object each answer box belongs to (the scene object whose box
        overlaps it most). The targets of ferret.training.grounding.AttentionSupervision."""
        from ferret.eval.metrics import box_iou

        record = self.records[int(scene_id)]
        out = torch.zeros(len(boxes), self.grid * self.grid, dtype=torch.bool)
        for i, box in enumerate(boxes):
            overlaps = [box_iou(tuple(box), tuple(o["box"])) for o in record["objects"]]
            out[i] = self._cells_of(int(scene_id), int(np.argmax(overlaps)))
        return out

    def _cells_of(self, scene_id: int, index: int) -> torch.Tensor:
        """[grid*grid] bool cells of object `index` of the scene; computed once (every LLM step asks
        for its answer boxes' objects, and the same objects come back epoch after epoch)."""
        from ferret.data.rle import decode_rle

        key = (scene_id, index)
        if key not in self._object_cells:
            record = self.records[scene_id]
            mask = decode_rle(record["objects"][index]["mask"], (int(record["height"]), int(record["width"])))
            cover = patch_coverage(mask, self.grid).reshape(-1)
            cells = cover >= self.min_cover
            if not cells.any():
                cells[int(cover.argmax())] = True
            self._object_cells[key] = torch.from_numpy(cells)
        return self._object_cells[key]

    def object_cells(self, scene_id, name: str) -> torch.Tensor | None:
        """[grid*grid] bool cells of the scene's object called `name` (as answer_box_cells), or
        None when the scene has no such object."""
        record = self.records[int(scene_id)]
        for obj in record["objects"]:
            if obj["name"] == name:
                return self.answer_box_cells(scene_id, [obj["box"]])[0]
        return None

    def region_targets(self, scene_id, region_masks: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """region_color / region_shape [R] and region_box [R, 4] of the referred regions ((W, H) bool masks)."""
        return region_object_targets(self.records[int(scene_id)], region_masks, self.vocabulary)


def region_object_targets(record: Mapping, region_masks: Sequence[torch.Tensor],
                          vocabulary: DenseVocabulary) -> dict[str, torch.Tensor]:
    """Colour and shape class [R] of the object each (W, H) region mask overlaps most (0 when it
    overlaps none: a region on the background), and its box [R, 4] on the 0-999 grid (the box
    code's target; zeros on the background)."""
    from ferret.data.rle import decode_rle
    from ferret.regions import pixel_to_grid

    width, height = int(record["width"]), int(record["height"])
    color = torch.zeros(len(region_masks), dtype=torch.long)
    shape = torch.zeros(len(region_masks), dtype=torch.long)
    box = torch.zeros(len(region_masks), 4, dtype=torch.long)
    if not region_masks:
        return {"region_color": color, "region_shape": shape, "region_box": box}
    objects = torch.stack([torch.from_numpy(decode_rle(o["mask"], (height, width)).T.copy())
                           for o in record["objects"]])  # [K, W, H] like the region masks
    for r, mask in enumerate(region_masks):
        if tuple(mask.shape) != (width, height):
            raise ValueError(f"scene {record.get('scene_id')}: region mask {tuple(mask.shape)} is not the "
                             f"image's (W, H) = {(width, height)}")
        overlap = (objects & mask.bool().unsqueeze(0)).flatten(1).sum(1)
        if int(overlap.max()) == 0:
            continue
        obj = record["objects"][int(overlap.argmax())]
        color[r] = vocabulary.colors.index(obj["color"]) + 1
        shape[r] = vocabulary.shapes.index(obj["shape"]) + 1
        x1, y1, x2, y2 = obj["box"]
        box[r] = torch.tensor([pixel_to_grid(x1, width), pixel_to_grid(y1, height),
                               pixel_to_grid(x2, width), pixel_to_grid(y2, height)])
    return {"region_color": color, "region_shape": shape, "region_box": box}


def dense_readout_loss(image_tokens: torch.Tensor, patch_color: torch.Tensor, patch_shape: torch.Tensor,
                       patch_box: torch.Tensor, vocabulary: DenseVocabulary,
                       directions: NameDirections | None = None) -> torch.Tensor:
    """Loss of the readout from projected image tokens [B, N, hidden] (N = grid*grid patches, a
    leading CLS token dropped) against targets [B, N] and grid boxes [B, N, 4]."""
    cells = patch_color.shape[-1]
    tokens = image_tokens[:, -cells:].float()
    loss = class_readout_loss(tokens, patch_color, patch_shape, vocabulary, directions)
    covered = patch_color > 0
    if covered.any():
        predicted = tokens[..., :BOX_CHANNELS][covered]
        loss = loss + F.l1_loss(predicted, patch_box[covered].float() / 1000.0)
    return loss


def class_readout_loss(vectors: torch.Tensor, color: torch.Tensor, shape: torch.Tensor,
                       vocabulary: DenseVocabulary, directions: NameDirections | None = None) -> torch.Tensor:
    """Colour and shape CE of [..., hidden] vectors against [...] class targets, read on dedicated
    channels (colour logits, then shape logits, after the box channels) and, with `directions`,
    also on the names' word embeddings (`class_logits`), so that the vector reads to the LLM
    like the words of its object's name."""
    nc, ns = vocabulary.num_colors, vocabulary.num_shapes
    if vectors.shape[-1] < BOX_CHANNELS + nc + ns:
        raise ValueError(f"vectors have {vectors.shape[-1]} channels; the readout needs {BOX_CHANNELS + nc + ns}")
    own = vectors[..., BOX_CHANNELS : BOX_CHANNELS + nc + ns].float()
    pairs = [(own[..., :nc], color), (own[..., nc:], shape)]
    if directions is not None:
        pairs += list(zip(class_logits(vectors, directions), (color, shape)))
    loss = 0.0
    for logits, target in pairs:
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return loss

