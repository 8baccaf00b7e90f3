"""Benchmark report on the synthetic world: export its test scenes in the RefCOCO, Flickr30k,
LVIS and POPE formats, run the four tasks with one model and write one metrics json.

    python -m ferret.data.synthetic --out data/synth --n 2000 --seed 0
    python -m ferret.eval.synthetic_report --data data/synth --out results/synth [--model-path PATH]

Reads `<data>/scenes_test.json` (each scene's image, size and objects with name, colour,
shape, box and mask) and the images next to it. Only objects whose name is unique in their
scene are asked about, so every question has one right answer. Everything drawn at random
(LVIS points and distractors, POPE negatives) follows from `--seed`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ferret.data.rle import decode_rle
from ferret.eval import flickr, lvis, pope, refcoco
from ferret.eval.common import AnswerFn, EvalSetupError, load_answer_fn, read_json_file, write_json
from ferret.eval.metrics import xyxy_to_xywh

DATASET_NAME = "synthetic"
REPORT_FILE = "synthetic_report.json"
POPE_SETTINGS = ("random", "popular", "adversarial")


def load_scenes(data_dir: str | Path, max_scenes: int | None = None, split: str = "test") -> list[dict]:
    path = Path(data_dir) / f"scenes_{split}.json"
    scenes = read_json_file(path)
    if not isinstance(scenes, list):
        raise EvalSetupError(f"{path} must hold a list of scene records")
    return scenes[:max_scenes] if max_scenes else scenes


def unique_objects(scene: dict) -> list[dict]:
    """Objects whose name no other object of the scene shares."""
    counts = Counter(o["name"] for o in scene["objects"])
    return [o for o in scene["objects"] if counts[o["name"]] == 1]


def _coco_box(obj: dict) -> list[float]:
    return [float(v) for v in xyxy_to_xywh(obj["box"])]


def export_refcoco(scenes: list[dict]) -> dict:
    """One referring expression ("the red circle") per uniquely named object, MDETR-style json."""
    images, annotations = [], []
    for scene in scenes:
        for obj in unique_objects(scene):
            k = len(images)
            images.append({"file_name": scene["image"], "width": scene["width"], "height": scene["height"],
                           "id": k, "caption": f"the {obj['name']}", "dataset_name": DATASET_NAME,
                           "original_id": scene["scene_id"]})
            annotations.append({"id": k, "image_id": k, "bbox": _coco_box(obj), "category_id": 1,
                                "area": obj["area"], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def export_flickr(scenes: list[dict]) -> dict:
    """One caption per scene naming its uniquely named objects ("A red circle, a blue star and
    a green cross."), with a phrase span per object, MDETR-style json."""
    images, annotations = [], []
    for scene in scenes:
        objects = sorted(unique_objects(scene), key=lambda o: o["box"][0])
        if not objects:
            continue
        phrases = [f"{'A' if i == 0 else 'a'} {o['name']}" for i, o in enumerate(objects)]
        caption, spans = "", []
        for i, phrase in enumerate(phrases):
            if i:
                caption += " and " if i == len(phrases) - 1 else ", "
            spans.append([len(caption), len(caption) + len(phrase)])
            caption += phrase
        caption += "."
        k = len(images)
        images.append({"file_name": scene["image"], "width": scene["width"], "height": scene["height"], "id": k,
                       "caption": caption, "dataset_name": DATASET_NAME, "original_img_id": scene["scene_id"],
                       "sentence_id": 0, "tokens_positive_eval": [[span] for span in spans]})
        for obj, span in zip(objects, spans):
            annotations.append({"id": len(annotations), "image_id": k, "bbox": _coco_box(obj),
                                "tokens_positive": [span], "category_id": 1, "area": obj["area"], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def all_names(scenes: list[dict]) -> list[str]:
    return sorted({o["name"] for s in scenes for o in s["objects"]})


def export_lvis(scenes: list[dict], seed: int) -> list[dict]:
    """LVIS-style records: per uniquely named object a point on its visible pixels, its
    normalised box and a distractor class absent from the scene."""
    rng = np.random.default_rng([seed, 11])
    names = all_names(scenes)
    records = []
    for scene in scenes:
        width, height = scene["width"], scene["height"]
        present = {o["name"] for o in scene["objects"]}
        absent = [n for n in names if n not in present]
        for obj in unique_objects(scene):
            mask = decode_rle(obj["mask"], (height, width))
            ys, xs = np.nonzero(mask)
            if len(xs) == 0 or not absent:
                continue
            pick = int(rng.integers(len(xs)))
            x1, y1, x2, y2 = obj["box"]
            records.append({
                "id": len(records), "image_path": scene["image"], "width": width, "height": height,
                "name": obj["name"], "synonyms": [], "neg_class": absent[int(rng.integers(len(absent)))],
                "sample_point": [int(xs[pick]), int(ys[pick])],
                "bbox_norm": [x1 / width, y1 / height, x2 / width, y2 / height],
                "bbox": _coco_box(obj),
            })
    return records


def export_pope(scenes: list[dict], seed: int, per_scene: int = 2) -> dict[str, list[dict]]:
    """POPE-style yes/no questions per setting: up to `per_scene` present objects (yes) and as
    many absent ones (no), the absent ones drawn at random, from the most frequent names
    (popular) or among names sharing a colour or shape with a present object (adversarial)."""
    frequency = Counter(o["name"] for s in scenes for o in s["objects"])
    names = all_names(scenes)
    out: dict[str, list[dict]] = {s: [] for s in POPE_SETTINGS}
    for setting in POPE_SETTINGS:
        rng = np.random.default_rng([seed, 23, POPE_SETTINGS.index(setting)])
        for scene in scenes:
            present_objs = scene["objects"]
            present = sorted({o["name"] for o in present_objs})
            absent = [n for n in names if n not in present]
            yes = [present[i] for i in rng.permutation(len(present))[:per_scene]]
            if setting == "random":
                candidates = [absent[i] for i in rng.permutation(len(absent))]
            elif setting == "popular":
                candidates = sorted(absent, key=lambda n: (-frequency[n], n))
            else:
                colours = {o["color"] for o in present_objs}
                shapes = {o["shape"] for o in present_objs}
                related = [n for n in absent if n.split(" ")[0] in colours or n.split(" ")[-1] in shapes]
                candidates = [related[i] for i in rng.permutation(len(related))] or absent
            no = candidates[:len(yes)]
            for name, label in [(n, "yes") for n in yes] + [(n, "no") for n in no]:
                out[setting].append({"question_id": len(out[setting]), "image": scene["image"],
                                     "text": f"Is there a {name} in the image?", "label": label})
    return out


def export_all(scenes: list[dict], folder: Path, seed: int) -> dict[str, list[Path]]:
    """Write the four benchmark files under `folder`; returns the paths per task."""
    folder.mkdir(parents=True, exist_ok=True)
    refcoco_path = folder / "finetune_synthetic_test.json"
    refcoco_path.write_text(json.dumps(export_refcoco(scenes)))
    flickr_path = folder / "final_flickr_synthetic_test.json"
    flickr_path.write_text(json.dumps(export_flickr(scenes)))
    lvis_path = folder / "lvis_synthetic_eval.jsonl"
    lvis_path.write_text("".join(json.dumps(r) + "\n" for r in export_lvis(scenes, seed)))
    pope_paths = []
    for setting, records in export_pope(scenes, seed).items():
        path = folder / f"synthetic_pope_{setting}.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        pope_paths.append(path)
    return {"refcoco": [refcoco_path], "flickr": [flickr_path], "lvis": [lvis_path], "pope": pope_paths}


def headline(task: str, metrics: dict) -> dict:
    """The few numbers of a task's metrics that go into the report's summary."""
    if task == "refcoco":
        return {"acc@0.5": metrics["overall_accuracy"], "mean_iou": metrics["mean_iou"]}
    if task == "flickr":
        return {f"{protocol}_{k}": v for protocol, values in metrics["recall"].items() for k, v in values.items()}
    if task == "lvis":
        return {f"acc_{fmt}": v for fmt, v in metrics["accuracy"].items()}
    return {f"{setting}_{key}": values[key] for setting, values in metrics["settings"].items()
            for key in ("accuracy", "f1", "yes_ratio")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="synthetic world folder (scenes_test.json, images/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-path", default=None, help="model folder; default: the embedded model")
    parser.add_argument("--max-scenes", type=int, default=40,
                        help="only the first N test scenes (default 40, ~20 questions each, to bound CPU time; "
                             "0 for all)")
    parser.add_argument("--split", default="test", choices=["test", "val", "ood"],
                        help="which held-out scenes (val: for choosing settings without touching test; ood: the "
                             "out-of-generator scenes of ferret.eval.ood_scenes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--visualize", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None, answer_fn: AnswerFn | None = None) -> dict:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    scenes = load_scenes(args.data, args.max_scenes, args.split)
    out = Path(args.out)
    files = export_all(scenes, out / "benchmarks", args.seed)
    if answer_fn is None:
        answer_fn = load_answer_fn(args)  # one model for all four tasks
    common = ["--batch-size", str(args.batch_size), "--visualize", str(args.visualize)]
    common += ["--no-progress"] if args.no_progress else []
    if args.model_path:
        common += ["--model-path", args.model_path]
    images = str(Path(args.data))
    runs = {
        "refcoco": (refcoco.main, images),
        "flickr": (flickr.main, images),
        "lvis": (lvis.main, str(Path(args.data) / "images")),
        "pope": (pope.main, images),
    }
    report: dict = {"data": str(args.data), "split": args.split, "model_path": args.model_path, "num_scenes": len(scenes),
                    "seed": args.seed, "summary": {}, "tasks": {}}
    for task, (task_main, image_dir) in runs.items():
        extra = ["--seed", str(args.seed)] if task == "lvis" else []
        metrics = task_main(["--data", *map(str, files[task]), "--images", image_dir, "--out", str(out / task),
                             *common, *extra], answer_fn=answer_fn)
        report["tasks"][task] = metrics
        report["summary"][task] = headline(task, metrics)
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(out / REPORT_FILE, report)
    print(json.dumps(report["summary"], indent=2))
    print(f"report: {out / REPORT_FILE} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
