"""Readers for the other data formats Ferret uses, as typed records.

* LLaVA conversation json (a list of {"id", "image", "conversations"} without regions): the
  same dict form as GRIT samples, loaded through `GritDataset`.
* RefCOCO / RefCOCO+ / RefCOCOg (MDETR-style COCO json, released `eval/model_refcoco.py`): one
  image entry per referring expression (`caption`) with exactly one annotation box.
* Flickr30k Entities (MDETR-style COCO json, released `eval/model_flickr.py`): one image entry
  per caption; `tokens_positive_eval` spans name the phrases, annotations hold the boxes.

COCO boxes are [x, y, w, h]; records carry [x1, y1, x2, y2] = [x, y, x + w, y + h] in pixels,
unclipped (the released evaluation's clip has no effect). Questions are the released prompts.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from ferret.data.errors import DataFormatError, read_json
from ferret.data.grit import load_grit_file

REFEXP_QUESTION = "What is the location of <obj> in the image?"
FLICKR_QUESTION = "What are the locations of <objs>?"
EXTRA_KEYS = ("sentence_id", "original_img_id", "original_id", "task_id")


def remove_punctuation(text: str) -> str:
    """Released clean-up of captions before they enter a prompt: commas dropped, stripped."""
    return text.replace(",", "").strip()


def xywh_to_xyxy(box: Any) -> tuple[float, float, float, float]:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise ValueError(f"COCO bbox must be [x, y, w, h] numbers, got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        raise ValueError(f"COCO bbox has a negative size: {box!r}")
    return x, y, x + w, y + h


@dataclass(frozen=True)
class RefExpRecord:
    image_id: int
    file_name: str
    caption: str  # the referring expression
    width: int
    height: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 pixels
    dataset_name: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def question(self) -> str:
        return REFEXP_QUESTION.replace("<obj>", remove_punctuation(self.caption))


@dataclass(frozen=True)
class FlickrRecord:
    image_id: int
    file_name: str
    caption: str
    width: int
    height: int
    entities: tuple[str, ...]  # phrases of `tokens_positive_eval`, lower-cased, commas removed
    boxes: tuple[tuple[float, float, float, float], ...]  # every annotation box, file order
    box_tokens_positive: tuple[tuple[tuple[int, int], ...], ...]  # caption spans of each box
    dataset_name: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def question(self) -> str:
        return FLICKR_QUESTION.replace("<objs>", ", ".join(self.entities))


# ---------------------------------------------------------------- readers


def load_llava_file(path: str, image_folder: str | None = None, check_images: bool = True,
                    skipped: Counter | None = None) -> list[dict]:
    """LLaVA conversations: GRIT samples without boxes (tagged dataset 'llava_instruct')."""
    return [dict(s, dataset=s.get("dataset", "llava_instruct"))
            for s in load_grit_file(path, image_folder, check_images, skipped)]


def _coco_tables(path: str) -> tuple[list[dict], dict[int, list[dict]]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataFormatError(f"{path}: expected a COCO json object with 'images' and 'annotations' lists")
    by_image: dict[int, list[dict]] = defaultdict(list)
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "bbox" not in ann:
            raise DataFormatError(f"{path}: annotation {k} needs 'image_id' and 'bbox'")
        by_image[ann["image_id"]].append(ann)
    return data["images"], by_image


def _image_fields(path: str, k: int, image: Any, need: tuple[str, ...]) -> None:
    if not isinstance(image, dict):
        raise DataFormatError(f"{path}: images[{k}] is not an object")
    missing = [key for key in need if key not in image]
    if missing:
        raise DataFormatError(f"{path}: images[{k}] (id {image.get('id')!r}) lacks {', '.join(missing)}")


def _box(path: str, k: int, ann: dict) -> tuple[float, float, float, float]:
    try:
        return xywh_to_xyxy(ann["bbox"])
    except ValueError as err:
        raise DataFormatError(f"{path}: images[{k}]: {err}") from err


def load_refexp(path: str) -> list[RefExpRecord]:
    """RefCOCO/RefCOCO+/RefCOCOg annotations, one record per referring expression."""
    images, by_image = _coco_tables(path)
    records = []
    for k, image in enumerate(images):
        _image_fields(path, k, image, ("id", "file_name", "caption", "width", "height"))
        anns = by_image.get(image["id"], [])
        if len(anns) != 1:
            raise DataFormatError(f"{path}: images[{k}] (id {image['id']}) has {len(anns)} annotations, expected 1")
        records.append(RefExpRecord(
            image_id=image["id"], file_name=image["file_name"], caption=image["caption"],
            width=int(image["width"]), height=int(image["height"]), box=_box(path, k, anns[0]),
            dataset_name=image.get("dataset_name"),
            extras={key: image[key] for key in EXTRA_KEYS if key in image},
        ))
    return records


def load_flickr(path: str) -> list[FlickrRecord]:
    """Flickr30k-Entities annotations, one record per caption."""
    images, by_image = _coco_tables(path)
    records = []
    for k, image in enumerate(images):
        _image_fields(path, k, image, ("id", "file_name", "caption", "width", "height", "tokens_positive_eval"))
        caption = image["caption"]
        entities = []
        for spans in image["tokens_positive_eval"]:
            try:
                start, end = spans[0]
            except (TypeError, ValueError, IndexError):
                raise DataFormatError(f"{path}: images[{k}] tokens_positive_eval entry {spans!r} is not "
                                      "a list of [start, end] spans") from None
            if not (0 <= start <= end <= len(caption)):
                raise DataFormatError(f"{path}: images[{k}] span [{start}, {end}] is outside its caption")
            entities.append(remove_punctuation(caption[start:end].lower()))
        anns = by_image.get(image["id"], [])
        records.append(FlickrRecord(
            image_id=image["id"], file_name=image["file_name"], caption=caption,
            width=int(image["width"]), height=int(image["height"]), entities=tuple(entities),
            boxes=tuple(_box(path, k, ann) for ann in anns),
            box_tokens_positive=tuple(tuple(tuple(span) for span in ann.get("tokens_positive", [])) for ann in anns),
            dataset_name=image.get("dataset_name"),
            extras={key: image[key] for key in EXTRA_KEYS if key in image},
        ))
    return records


def resolve_image(folder: str, record: RefExpRecord | FlickrRecord) -> str:
    """Full path of a record's image (FileNotFoundError naming it when absent)."""
    path = os.path.join(folder, record.file_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image of record {record.image_id} not found: {path}")
    return path
