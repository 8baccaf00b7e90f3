"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding (Acc@0.5 per split).

    python -m ferret.eval.refcoco --model-path PATH \
        --data finetune_refcoco_val.json finetune_refcoco_testA.json ... \
        --images coco/train2014 --out results/refcoco

Annotation files are the released MDETR-style json (`finetune_refcoco_testA.json`, ...): each
entry of `images` is one expression (`caption`, `file_name`, `width`, `height`, `dataset_name`)
with exactly one entry of `annotations` (same `image_id`, `bbox` in COCO xywh pixels); they are
read by `ferret.data.formats.load_refexp`, and an unusable entry is counted, not fatal.
Protocol (released): ask "What is the location of <expression> in the image?" (commas
removed), take the first box of the answer, map it from the 0-999 grid to pixels and count a
hit when its IoU with the true box is >= 0.5.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from ferret.data.formats import load_refexp
from ferret.eval.common import (AnswerFn, EvalSample, LoadedSamples, read_records, require_samples, run_task,
                                summary_line, task_parser)
from ferret.eval.metrics import IOU_THRESHOLD, box_iou, clip_box, decode_grounded_boxes

_SPLIT_IN_NAME = re.compile(r"_(val|testA|testB|test|train)$")


def split_name(data_path: str | os.PathLike, dataset_name: str | None) -> str:
    """`<dataset>_<split>` for a file such as finetune_refcocog_test.json ("refcocog_test")."""
    stem = Path(data_path).stem
    match = _SPLIT_IN_NAME.search(stem)
    split = match.group(1) if match else stem
    return f"{dataset_name}_{split}" if dataset_name else split


def load_samples(data_paths: list[str], images_dir: str) -> LoadedSamples:
    """One sample per expression of the `ferret.data.formats.load_refexp` records."""
    loaded = LoadedSamples(samples=[])
    for path, record in read_records(data_paths, load_refexp, loaded):
        split = split_name(path, record.dataset_name)
        loaded.samples.append(EvalSample(
            sample_id=f"{split}:{record.image_id}",
            image=os.path.join(images_dir, record.file_name),
            question=record.question,
            meta={"split": split, "expression": record.caption,
                  "box": clip_box(record.box, record.width, record.height),
                  "width": record.width, "height": record.height},
        ))
    return require_samples(loaded, "RefCOCO samples", data_paths)


def first_pred_box(sample: EvalSample, record: dict) -> list[int] | None:
    """First box of the answer in pixels of the annotated image size, None when there is none."""
    boxes = decode_grounded_boxes(record["text"], sample.meta["width"], sample.meta["height"])
    return list(boxes[0].box) if boxes else None


def score(answered: list[tuple[EvalSample, dict]]) -> dict:
    hits: dict[str, list[bool]] = defaultdict(list)
    unparsable = []
    ious = []
    for sample, record in answered:
        pred = first_pred_box(sample, record)
        if pred is None:
            unparsable.append({"id": sample.sample_id, "text": record["text"]})
            iou = 0.0
        else:
            iou = box_iou(pred, sample.meta["box"])
        ious.append(iou)
        hits[sample.meta["split"]].append(iou >= IOU_THRESHOLD)
    all_hits = [h for split_hits in hits.values() for h in split_hits]
    return {
        "metric": f"Acc@{IOU_THRESHOLD} (first predicted box)",
        "accuracy": {split: sum(h) / len(h) for split, h in sorted(hits.items())},
        "counts": {split: len(h) for split, h in sorted(hits.items())},
        "overall_accuracy": sum(all_hits) / len(all_hits) if all_hits else 0.0,
        "mean_iou": sum(ious) / len(ious) if ious else 0.0,
        "num_unparsable": len(unparsable),
        "unparsable": unparsable,
    }


def boxes_for_picture(sample: EvalSample, record: dict) -> tuple[list, list]:
    pred = first_pred_box(sample, record)
    return ([pred] if pred else []), [sample.meta["box"]]


def build_parser() -> argparse.ArgumentParser:
    return task_parser(__doc__, data_help="RefCOCO/+/g json files (one per split)",
                       images_help="folder of the COCO train2014 images")


def main(argv: list[str] | None = None, answer_fn: AnswerFn | None = None) -> dict:
    args = build_parser().parse_args(argv)
    loaded = load_samples(args.data, args.images)
    metrics = run_task("refcoco", loaded, score, args, answer_fn=answer_fn, boxes_fn=boxes_for_picture)
    print(summary_line(metrics, ["overall_accuracy", "num_answered", "num_unparsable", "missing_images"]))
    for split, acc in metrics["accuracy"].items():
        print(f"  {split}: {acc:.4f} ({metrics['counts'][split]})")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
