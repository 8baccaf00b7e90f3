"""The synthetic world's per-sample training targets, attached to the generic dataset's items.

`GritDataset` and `FerretCollator` know nothing of the synthetic world. When a run has scene
records (`data.scene_records`), `SceneTargetDataset` adds to each item whose sample names a known
`scene_id` the targets of the auxiliary losses (ferret.training.synthetic_world):

* patch_color / patch_shape [N] and patch_box [N, 4]: the dense readout's per-patch targets;
* region_color / region_shape [R], region_box [R, 4]: the object each referred region overlaps most;
* answer_cells [boxes, N]: the cells of the object each answer box belongs to;
* presence_cells [assistant turns, 1 + N]: the "Is there a X?" answers' attention targets;
* region_cells [assistant turns, N]: for a turn that asks about one region and answers without a
  box ("What is the object <region>?" -> "A pink ring."), the cells of the region's object.

`SceneTargetCollator` batches them (only when every item of the batch has them: a batch mixing
scenes with and without records trains the auxiliary losses on none of them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ferret.data.grit import PLACEHOLDER_RE
from ferret.training.dense_supervision import ScenePatchTargets

STACKED_KEYS = ("patch_color", "patch_shape", "patch_box")  # same shape in every item: a tensor
PER_ITEM_KEYS = ("region_color", "region_shape", "region_box", "answer_cells", "presence_cells", "region_cells")  # a list, like region_masks
PRESENCE_RE = re.compile(r"Is there an? (.+?) in the image\?")


def answer_boxes(sample: dict) -> list[list[float]]:
    """The pixel boxes the assistant turns write, in text order (placeholders in order of
    appearance, turn after turn)."""
    box_lists = sample.get("box_x1y1x2y2")
    if box_lists is None:
        return []
    out = []
    for t, turn in enumerate(sample["conversations"]):
        if turn["from"] in ("human", "user"):
            continue
        out += [list(box_lists[t][int(m.group(1))]) for m in PLACEHOLDER_RE.finditer(turn["value"])]
    return out


def presence_targets(sample: dict, targets: ScenePatchTargets) -> torch.Tensor:
    """[assistant turns, 1 + cells] bool attention targets of the "Is there a X?" answers: X's cells
    when X is in the scene, column 0 (the BOS sink) when it is not; all False for other turns."""
    cells = targets.grid ** 2
    turns = [t for t, turn in enumerate(sample["conversations"]) if turn["from"] not in ("human", "user")]
    out = torch.zeros(len(turns), 1 + cells, dtype=torch.bool)
    for row, t in enumerate(turns):
        match = PRESENCE_RE.search(sample["conversations"][t - 1]["value"]) if t > 0 else None
        if match is None:
            continue
        found = targets.object_cells(sample["scene_id"], match.group(1))
        if found is None:
            out[row, 0] = True
        else:
            out[row, 1:] = found
    return out


def region_cells(sample: dict, targets: ScenePatchTargets) -> torch.Tensor:
    """[assistant turns, cells] bool: for each turn whose question refers to exactly one region and
    whose answer writes no box (so it names, or gives the colour of, that region's object, not
    another one as "Which object is nearest to <region>?" does), the cells of the object whose box
    overlaps the region's box most; all False for other turns. The targets of
    ferret.training.grounding.AttentionSupervision's `region_name`."""
    conversations, box_lists = sample["conversations"], sample.get("box_x1y1x2y2") or []
    turns = [t for t, turn in enumerate(conversations) if turn["from"] not in ("human", "user")]
    out = torch.zeros(len(turns), targets.grid ** 2, dtype=torch.bool)
    for row, t in enumerate(turns):
        if t == 0 or t - 1 >= len(box_lists) or PLACEHOLDER_RE.search(conversations[t]["value"]):
            continue
        asked = {int(m.group(1)) for m in PLACEHOLDER_RE.finditer(conversations[t - 1]["value"])}
        if len(asked) == 1 and box_lists[t - 1]:
            out[row] = targets.answer_box_cells(sample["scene_id"], [box_lists[t - 1][asked.pop()]])[0]
    return out


class SceneTargetDataset(torch.utils.data.Dataset):
    """A GritDataset whose items also carry the scene targets (see the module docstring)."""

    def __init__(self, dataset, targets: ScenePatchTargets):
        self.dataset, self.targets = dataset, targets

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def skip_report(self) -> str:
        return self.dataset.skip_report()

    def rough_lengths(self) -> list[int]:
        return self.dataset.rough_lengths()

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        sample = self.dataset.samples[item["sample_index"]]  # (a bad sample is replaced by a later one)
        scene = sample.get("scene_id")
        if "image" in sample and scene in self.targets:
            item.update(self.targets[scene])
            item.update(self.targets.region_targets(scene, item["region_masks"]))
            item["answer_cells"] = self.targets.answer_box_cells(scene, answer_boxes(sample))
            item["presence_cells"] = presence_targets(sample, self.targets)
            item["region_cells"] = region_cells(sample, self.targets)
        return item


@dataclass
class SceneTargetCollator:
    """A FerretCollator's batch plus the scene targets, when every item carries them."""

    collator: object  # ferret.data.collate.FerretCollator

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = self.collator(items)
        for key in STACKED_KEYS:
            if all(key in item for item in items):
                batch[key] = torch.stack([item[key] for item in items])
        for key in PER_ITEM_KEYS:
            if all(key in item for item in items):
                batch[key] = [item[key] for item in items]
        return batch
