"""LVIS referring object classification: accuracy with point and with box regions.

    python -m ferret.eval.lvis --model-path PATH --data lvis_eval.jsonl --images coco/val2017 \
        --out results/lvis [--region-formats point box] [--seed 0]

Annotation file: the released jsonl, one object per line with `id`, `image_path`, `width`,
`height`, `name`, `synonyms`, `neg_class` (the distractor), `sample_point` (pixels, a point
on the object) and `bbox_norm` (x1, y1, x2, y2 divided by the image size).

Protocol (released): ask "Is the object <location> of the image a <obj1> or a <obj2>?" where
the location is the point `[x, y] <region_fea>` or the box `[x1, y1, x2, y2] <region_fea>`
on the 0-999 grid, and obj1 / obj2 are the true class and the distractor in an order drawn
from `--seed` (the released script alternates by line). The answer is right when, after its
negated clauses ("..., not a dog.") are removed, it names the class or a synonym. We also
report a strict accuracy that additionally requires the distractor not to be named.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

from ferret.eval.common import (AnswerFn, EvalSample, EvalSetupError, LoadedSamples, existing_files, read_jsonl,
                                require_samples, run_task, summary_line, task_parser)
from ferret.eval.metrics import lvis_answer_correct, lvis_answer_correct_strict
from ferret.regions import Box, Point, RegionError

QUESTION = "Is the object <location> of the image a <obj1> or a <obj2>?"
REGION_FORMATS = ("point", "box")


def lvis_question(first_class: str, second_class: str) -> str:
    """The released prompt with a `<region>` placeholder (FerretChat fills it with the region)."""
    return (QUESTION.replace("<location>", "<region>")
            .replace("<obj1>", first_class).replace("<obj2>", second_class))


def class_order(record_id: str, name: str, distractor: str, seed: int) -> tuple[str, str]:
    """True class and distractor in a random order that depends only on (seed, record id), so
    sharding or resuming never changes a question."""
    pair = [name, distractor]
    random.Random(f"{seed}:{record_id}").shuffle(pair)
    return pair[0], pair[1]


def readable(name: str) -> str:
    return name.replace("_", " ").strip()


def load_samples(data_paths: list[str], images_dir: str, region_formats=REGION_FORMATS,
                 seed: int = 0) -> LoadedSamples:
    loaded = LoadedSamples(samples=[])
    for path in existing_files(data_paths, loaded):
        for line_number, record in enumerate(read_jsonl(path), 1):
            try:
                samples = _object_samples(record, images_dir, region_formats, seed)
            except (KeyError, TypeError, ValueError) as err:
                loaded.bad_annotations.append(f"{path} line {line_number}: {err}")
                continue
            loaded.samples += samples
    return require_samples(loaded, "LVIS samples", data_paths)


def _object_samples(record: dict, images_dir: str, region_formats, seed: int) -> list[EvalSample]:
    record_id = str(record["id"])
    width, height = int(record["width"]), int(record["height"])
    name, distractor = readable(record["name"]), readable(record["neg_class"])
    first, second = class_order(record_id, name, distractor, seed)
    image = os.path.join(images_dir, Path(str(record["image_path"])).name)
    meta = {"name": record["name"], "synonyms": list(record.get("synonyms", [])), "distractor": distractor,
            "width": width, "height": height}
    samples = []
    for region_format in region_formats:
        if region_format == "point":
            x, y = (float(v) for v in record["sample_point"])
            if not (0 <= x < width and 0 <= y < height):
                raise RegionError(f"sample_point [{x}, {y}] lies outside the {width}x{height} image")
            region = Point(x, y)
        elif region_format == "box":
            # Fractional pixels keep the prompt's grid numbers at the released int(v * 1000).
            x1, y1, x2, y2 = (float(v) for v in record["bbox_norm"])
            region = Box(x1 * width, y1 * height, x2 * width, y2 * height)
        else:
            raise EvalSetupError(f"unknown region format {region_format!r}; choose from {REGION_FORMATS}")
        samples.append(EvalSample(
            sample_id=f"{record_id}:{region_format}", image=image,
            question=lvis_question(first, second), regions=(region,),
            meta={**meta, "region_format": region_format},
        ))
    return samples


def score(answered: list[tuple[EvalSample, dict]]) -> dict:
    correct: dict[str, list[bool]] = defaultdict(list)
    strict: dict[str, list[bool]] = defaultdict(list)
    unparsable = []
    for sample, record in answered:
        text, meta = record["text"], sample.meta
        if not text.strip():
            unparsable.append({"id": sample.sample_id, "text": text})
        correct[meta["region_format"]].append(lvis_answer_correct(text, meta["name"], meta["synonyms"]))
        strict[meta["region_format"]].append(
            lvis_answer_correct_strict(text, meta["name"], meta["synonyms"], meta["distractor"]))
    return {
        "metric": "accuracy (released name/synonym match after removing negations)",
        "accuracy": {f: sum(v) / len(v) for f, v in sorted(correct.items())},
        "accuracy_strict": {f: sum(v) / len(v) for f, v in sorted(strict.items())},
        "counts": {f: len(v) for f, v in sorted(correct.items())},
        "num_unparsable": len(unparsable),
        "unparsable": unparsable,
    }


def boxes_for_picture(sample: EvalSample, record: dict) -> tuple[list, list]:
    region = sample.regions[0]
    if isinstance(region, Point):
        true = [[region.x - 5, region.y - 5, region.x + 5, region.y + 5]]
    else:
        true = [list(region.coords)]
    return [], true


def build_parser() -> argparse.ArgumentParser:
    parser = task_parser(__doc__, data_help="LVIS referring jsonl file(s)", images_help="folder of COCO val2017 images")
    parser.add_argument("--region-formats", nargs="+", default=list(REGION_FORMATS), choices=REGION_FORMATS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the class order in the questions")
    return parser


def main(argv: list[str] | None = None, answer_fn: AnswerFn | None = None) -> dict:
    args = build_parser().parse_args(argv)
    loaded = load_samples(args.data, args.images, args.region_formats, args.seed)
    metrics = run_task("lvis", loaded, score, args, answer_fn=answer_fn, boxes_fn=boxes_for_picture)
    print(summary_line(metrics, ["num_answered", "num_unparsable", "missing_images"]))
    for region_format, acc in metrics["accuracy"].items():
        print(f"  {region_format}: {acc:.4f} (strict {metrics['accuracy_strict'][region_format]:.4f})")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
