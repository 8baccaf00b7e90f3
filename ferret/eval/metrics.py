"""Metric functions of the Ferret benchmarks, each a small pure function.

Conventions (the released evaluation's): boxes are `[x1, y1, x2, y2]` in pixels with
area `(x2 - x1) * (y2 - y1)` (no +1), IoU >= 0.5 is a hit, and the model's answer writes
boxes on the 0-999 grid, mapped back to pixels by truncation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ferret.regions import grid_to_box, parse_grounding

IOU_THRESHOLD = 0.5

BoxLike = Sequence[float]


# ----------------------------------------------------------------------------- boxes

# (COCO `[x, y, w, h]` -> xyxy is ferret.data.formats.xywh_to_xyxy, where the annotations are read.)
def xyxy_to_xywh(box: BoxLike) -> list[float]:
    """`[x1, y1, x2, y2]` -> COCO `[x, y, w, h]`."""
    x1, y1, x2, y2 = _four_numbers(box)
    return [x1, y1, x2 - x1, y2 - y1]


def clip_box(box: BoxLike, width: float, height: float) -> list[float]:
    """Clamp an xyxy box to the image rectangle `[0, width] x [0, height]`."""
    x1, y1, x2, y2 = _four_numbers(box)
    return [min(max(x1, 0), width), min(max(y1, 0), height),
            min(max(x2, 0), width), min(max(y2, 0), height)]


def box_iou_matrix(boxes1: Iterable[BoxLike], boxes2: Iterable[BoxLike]) -> np.ndarray:
    """Pairwise IoU `[N, M]` of xyxy boxes; a pair whose union is empty has IoU 0."""
    a = _as_box_array(boxes1)
    b = _as_box_array(boxes2)
    area_a = _areas(a)
    area_b = _areas(b)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return iou


def box_iou(box1: BoxLike, box2: BoxLike) -> float:
    """IoU of two xyxy boxes."""
    return float(box_iou_matrix([box1], [box2])[0, 0])


def merge_boxes(boxes: Iterable[BoxLike]) -> list[float]:
    """Smallest xyxy box enclosing all `boxes` (the Flickr30k 'merged-box' target)."""
    arr = _as_box_array(boxes)
    if len(arr) == 0:
        raise ValueError("merge_boxes needs at least one box")
    return [float(arr[:, 0].min()), float(arr[:, 1].min()),
            float(arr[:, 2].max()), float(arr[:, 3].max())]


def hit_at_k(pred_boxes: Sequence[BoxLike], target_boxes: Sequence[BoxLike], k: int | None,
             iou_threshold: float = IOU_THRESHOLD) -> bool:
    """True when one of the first `k` predictions (all when k is None) overlaps any target
    box with IoU >= threshold. No prediction is a miss."""
    if not target_boxes:
        raise ValueError("hit_at_k needs at least one target box")
    preds = list(pred_boxes) if k is None else list(pred_boxes)[:k]
    if not preds:
        return False
    return bool(box_iou_matrix(preds, target_boxes).max() >= iou_threshold)


def recall(hits: Sequence[bool]) -> float:
    """Fraction of hits; 0.0 for an empty list (nothing found is nothing recalled)."""
    return float(sum(bool(h) for h in hits)) / len(hits) if hits else 0.0


# ----------------------------------------------------------------------------- answers

@dataclass(frozen=True)
class DecodedBox:
    """One box the model wrote: the phrase it grounds, the grid box and the pixel box."""

    phrase: str
    grid_box: tuple[int, int, int, int]
    box: tuple[int, int, int, int]


def decode_grounded_boxes(text: str, width: int, height: int) -> list[DecodedBox]:
    """Boxes in an answer, in order, each with the phrase written just before it
    (`ferret.regions.parse_grounding`: "a man [..], a dog [..] [..]" gives "a man", "a dog",
    "a dog"); points are left out and pixel boxes are truncated like the released scorers."""
    return [DecodedBox(g.phrase, tuple(g.grid), tuple(grid_to_box(g.grid, width, height, as_int=True)))
            for g in parse_grounding(text, width, height) if g.box is not None]


def normalize_phrase(phrase: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (the released phrase match)."""
    phrase = re.sub(r"[^\w\s]", "", phrase.lower())
    return " ".join(phrase.split())


def phrases_match(phrase1: str, phrase2: str) -> bool:
    """Equal after `normalize_phrase`."""
    return normalize_phrase(phrase1) == normalize_phrase(phrase2)


def parse_yes_no(text: str) -> str | None:
    """POPE answer -> "yes" / "no"; None for an empty answer.

    Released rule: only the first sentence counts; it is "no" when one of its words is
    "no", "No" or "not", otherwise "yes".
    """
    text = (text or "").strip()
    if not text:
        return None
    first_sentence = text.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if any(w in ("no", "No", "not") for w in words) else "yes"


def binary_classification_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict:
    """POPE metrics over yes/no answers; a None prediction (unparsable) is counted wrong.

    Returns accuracy, precision, recall, f1, yes_ratio (share of "yes" predictions among all
    answers) and the confusion counts. Ratios with an empty denominator are 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels):
        if label not in ("yes", "no"):
            raise ValueError(f"label must be 'yes' or 'no', got {label!r}")
        if pred is None:  # wrong whatever the label
            pred = "no" if label == "yes" else "yes"
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    total = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall_ = _ratio(tp, tp + fn)
    yes_answers = sum(1 for p in predictions if p == "yes")
    return {
        "accuracy": _ratio(tp + tn, total),
        "precision": precision,
        "recall": recall_,
        "f1": _ratio(2 * precision * recall_, precision + recall_),
        "yes_ratio": _ratio(yes_answers, len(predictions)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def lvis_class_names(name: str, synonyms: Iterable[str] = ()) -> list[str]:
    """Readable names of an LVIS class: underscores to spaces, "a_(b)" split into "a" and "b"."""
    names = [name.replace("_", " ").strip()]
    for synonym in synonyms:
        if "(" in synonym:
            head, _, tail = synonym.partition("(")
            names += [head.replace("_", " ").strip(), tail.replace(")", "").replace("_", " ").strip()]
        else:
            names.append(synonym.replace("_", " ").strip())
    return [n for n in dict.fromkeys(names) if n]


def remove_negated_phrases(text: str) -> str:
    """Drop " not ..." / " no ..." clauses up to the next comma or period (released LVIS rule),
    so "a cat, not a dog." keeps only "a cat,"."""
    text = re.sub(r"\s+not[^,.]*[,.]", "", text)
    return re.sub(r"\s+no[^,.]*[,.]", "", text)


def lvis_answer_correct(text: str, name: str, synonyms: Iterable[str] = ()) -> bool:
    """Released LVIS rule: after removing negated clauses, the class name or a synonym occurs
    (as a substring) in the answer."""
    kept = remove_negated_phrases(text)
    return any(n in kept for n in lvis_class_names(name, synonyms))


def lvis_answer_correct_strict(text: str, name: str, synonyms: Iterable[str], distractor: str) -> bool:
    """Stricter reading: the true class is named and the distractor is not (so repeating the
    question "a cat or a dog" is not credited)."""
    kept = remove_negated_phrases(text)
    return lvis_answer_correct(text, name, synonyms) and distractor.replace("_", " ").strip() not in kept


# ----------------------------------------------------------------------------- helpers

def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def _four_numbers(box: BoxLike) -> tuple[float, float, float, float]:
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as err:
        raise ValueError(f"a box must be four numbers, got {box!r}") from err
    if len(values) != 4 or not all(np.isfinite(values)):
        raise ValueError(f"a box must be four finite numbers, got {box!r}")
    return values[0], values[1], values[2], values[3]


def _as_box_array(boxes: Iterable[BoxLike]) -> np.ndarray:
    rows = [_four_numbers(b) for b in boxes]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
