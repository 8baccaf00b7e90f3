"""Readers for the other data formats Ferret uses, as typed records.

* LLaVA conversation json (a list of {"id", "image", "conversations"} without regions) needs
  no reader of its own: it is GRIT's dict form without boxes, read by
  `ferret.data.grit.load_grit_file` and encoded by `GritDataset`.
* RefCOCO / RefCOCO+ / RefCOCOg (MDETR-style COCO json, as the released evaluation reads it):
  one image entry per referring expression (`caption`) with exactly one annotation box.
* Flickr30k Entities (MDETR-style COCO json, as the released evaluation reads it): one image
  entry per caption; `tokens_positive_eval` spans name the phrases, annotations hold the boxes.

COCO boxes are [x, y, w, h]; records carry [x1, y1, x2, y2] = [x, y, x + w, y + h] in pixels,
unclipped (the released evaluation's clip has no effect). Questions are the released prompts.
These readers are the one parser of both files: `ferret.eval.refcoco` / `ferret.eval.flickr`
build their samples on the records.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from ferret.data.errors import DataFormatError, read_json

REFEXP_QUESTION = "What is the location of <obj> in the image?"
FLICKR_QUESTION = "What are the locations of <objs>?"
EXTRA_KEYS = ("sentence_id", "original_img_id", "original_id", "task_id")

XyxyBox = tuple[float, float, float, float]  # [x, y, x + w, y + h] pixels; x2 is an exclusive edge, unlike ferret.regions.Box
Span = tuple[int, int]  # [start, end) character offsets into a caption


def remove_punctuation(text: str) -> str:
    """Released clean-up of captions before they enter a prompt: commas dropped, stripped."""
    return text.replace(",", "").strip()


def xywh_to_xyxy(box: Any) -> XyxyBox:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise ValueError(f"COCO bbox must be [x, y, w, h] numbers, got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        raise ValueError(f"COCO bbox has a negative size: {box!r}")
    return x, y, x + w, y + h


def spans_overlap(a: Span, b: Span) -> bool:
    """Whether two [start, end) character spans share at least one character."""
    return a[0] < b[1] and b[0] < a[1]


@dataclass(frozen=True)
class RefExpRecord:
    image_id: int
    file_name: str
    caption: str  # the referring expression
    width: int
    height: int
    box: XyxyBox  # x1, y1, x2, y2 pixels
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
    boxes: tuple[XyxyBox, ...]  # every annotation box, file order
    box_tokens_positive: tuple[tuple[Span, ...], ...]  # caption spans of each box
    entity_spans: tuple[Span, ...] = ()  # caption span of each entity (its first span)
    dataset_name: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def question(self) -> str:
        return FLICKR_QUESTION.replace("<objs>", ", ".join(self.entities))

    def entity_text(self, index: int) -> str:
        """Entity `index` as the caption writes it (case and punctuation kept)."""
        start, end = self.entity_spans[index]
        return self.caption[start:end]

    def entity_boxes(self, index: int) -> tuple[XyxyBox, ...]:
        """The boxes of entity `index`: those whose `tokens_positive` overlap its caption span."""
        span = self.entity_spans[index]
        return tuple(box for box, spans in zip(self.boxes, self.box_tokens_positive)
                     if any(spans_overlap(s, span) for s in spans))


# ---------------------------------------------------------------- readers


def load_refexp(path: str, bad_entries: list[str] | None = None) -> list[RefExpRecord]:
    """RefCOCO/RefCOCO+/RefCOCOg annotations, one record per referring expression.

    An unusable entry raises DataFormatError, or, when `bad_entries` is a list, is described
    there and skipped (evaluation keeps going and reports it). A file that is missing, not json
    or not COCO-shaped always raises."""
    images, by_image = _coco_tables(path)

    def record(k: int, image: dict) -> RefExpRecord:
        header = _entry_header(path, k, image, ())
        anns = by_image.get(image["id"], [])
        if len(anns) != 1:
            raise DataFormatError(f"{path}: images[{k}] (id {image['id']}) has {len(anns)} annotations, expected 1")
        return RefExpRecord(**header, box=_box(path, k, anns[0]))

    return _read_entries(images, record, bad_entries)


def load_flickr(path: str, bad_entries: list[str] | None = None) -> list[FlickrRecord]:
    """Flickr30k-Entities annotations, one record per caption (`bad_entries`: as `load_refexp`)."""
    images, by_image = _coco_tables(path)

    def record(k: int, image: dict) -> FlickrRecord:
        header = _entry_header(path, k, image, ("tokens_positive_eval",))
        caption = header["caption"]
        if not isinstance(image["tokens_positive_eval"], list):
            raise DataFormatError(f"{path}: images[{k}] tokens_positive_eval is not a list")
        entity_spans = []
        for spans in image["tokens_positive_eval"]:
            span = _span(spans[0] if isinstance(spans, list) and spans else None)
            if span is None:
                raise DataFormatError(f"{path}: images[{k}] tokens_positive_eval entry {spans!r} is not "
                                      "a list of [start, end] spans")
            if span[1] > len(caption):
                raise DataFormatError(f"{path}: images[{k}] span [{span[0]}, {span[1]}] is outside its caption")
            entity_spans.append(span)
        anns = by_image.get(image["id"], [])
        return FlickrRecord(
            **header,
            entities=tuple(remove_punctuation(caption[start:end].lower()) for start, end in entity_spans),
            boxes=tuple(_box(path, k, ann) for ann in anns),
            box_tokens_positive=tuple(_annotation_spans(path, k, ann) for ann in anns),
            entity_spans=tuple(entity_spans),
        )

    return _read_entries(images, record, bad_entries)


def _coco_tables(path: str) -> tuple[list, dict[Any, list[dict]]]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataFormatError(f"{path}: expected a COCO json object with 'images' and 'annotations' lists")
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataFormatError(f"{path}: annotation {k} needs an 'image_id'")
        by_image[ann["image_id"]].append(ann)
    return data["images"], by_image


def _read_entries(images: list, record: Callable[[int, dict], Any], bad_entries: list[str] | None) -> list:
    records = []
    for k, image in enumerate(images):
        try:
            records.append(record(k, image))
        except DataFormatError as err:
            if bad_entries is None:
                raise
            bad_entries.append(str(err))
    return records


def _entry_header(path: str, k: int, image: Any, need: tuple[str, ...]) -> dict:
    """The fields every record has, checked: id, file name, caption, positive integer size."""
    if not isinstance(image, dict):
        raise DataFormatError(f"{path}: images[{k}] is not an object")
    missing = [key for key in ("id", "file_name", "caption", "width", "height", *need) if key not in image]
    if missing:
        raise DataFormatError(f"{path}: images[{k}] (id {image.get('id')!r}) lacks {', '.join(missing)}")
    where = f"{path}: images[{k}] (id {image['id']})"
    if not isinstance(image["file_name"], str) or not isinstance(image["caption"], str):
        raise DataFormatError(f"{where}: file_name and caption must be strings")
    size = (image["width"], image["height"])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise DataFormatError(f"{where}: width and height must be positive integers, got {size}")
    return {"image_id": image["id"], "file_name": image["file_name"], "caption": image["caption"],
            "width": image["width"], "height": image["height"], "dataset_name": image.get("dataset_name"),
            "extras": {key: image[key] for key in EXTRA_KEYS if key in image}}


def _box(path: str, k: int, ann: dict) -> XyxyBox:
    try:
        return xywh_to_xyxy(ann.get("bbox"))
    except ValueError as err:
        raise DataFormatError(f"{path}: images[{k}]: {err}") from err


def _span(value: Any) -> Span | None:
    """`value` as a (start, end) character span, None when it is not one."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return None
    start, end = value
    return (start, end) if 0 <= start <= end else None


def _annotation_spans(path: str, k: int, ann: dict) -> tuple[Span, ...]:
    raw = ann.get("tokens_positive", [])
    spans = [_span(value) for value in raw] if isinstance(raw, list) else [None]
    if None in spans:
        raise DataFormatError(f"{path}: images[{k}] annotation tokens_positive {raw!r} is not a list of "
                              "[start, end] spans")
    return tuple(spans)

