"""POPE object hallucination: accuracy, precision, recall, F1 and yes-ratio per setting.

    python -m ferret.eval.pope --model-path PATH \
        --data coco_pope_random.json coco_pope_popular.json coco_pope_adversarial.json \
        --images coco/val2014 --out results/pope

Annotation files: the released POPE jsonl, one question per line (`question_id`, `image`,
`text` such as "Is there a dog in the image?", `label` "yes"/"no"); the setting (random /
popular / adversarial) is read from the file name. Protocol (released): the question is asked
as is; an answer whose first sentence contains the word "no", "No" or "not" is a no, any other
answer a yes. An empty answer is counted wrong and listed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

from ferret.eval.common import (AnswerFn, EvalSample, LoadedSamples, existing_files, read_jsonl, require_samples,
                                run_task, summary_line, task_parser)
from ferret.eval.metrics import binary_classification_metrics, parse_yes_no

SETTINGS = ("random", "popular", "adversarial")


def setting_name(data_path: str | os.PathLike) -> str:
    stem = Path(data_path).stem
    for setting in SETTINGS:
        if setting in stem:
            return setting
    return stem


def load_samples(data_paths: list[str], images_dir: str) -> LoadedSamples:
    loaded = LoadedSamples(samples=[])
    for path in existing_files(data_paths, loaded):
        setting = setting_name(path)
        for line_number, record in enumerate(read_jsonl(path), 1):
            try:
                label = str(record["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"label must be yes or no, got {record['label']!r}")
                sample = EvalSample(
                    sample_id=f"{setting}:{record.get('question_id', line_number)}",
                    image=os.path.join(images_dir, str(record["image"])),
                    question=str(record["text"]),
                    meta={"setting": setting, "label": label},
                )
            except (KeyError, TypeError, ValueError) as err:
                loaded.bad_annotations.append(f"{path} line {line_number}: {err}")
                continue
            loaded.samples.append(sample)
    return require_samples(loaded, "POPE questions", data_paths)


def score(answered: list[tuple[EvalSample, dict]]) -> dict:
    by_setting: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    unparsable = []
    for sample, record in answered:
        answer = parse_yes_no(record["text"].lower())
        if answer is None:
            unparsable.append({"id": sample.sample_id, "text": record["text"]})
        preds, labels = by_setting[sample.meta["setting"]]
        preds.append(answer)
        labels.append(sample.meta["label"])
    return {
        "metric": "POPE yes/no (released first-sentence negation rule)",
        "settings": {s: binary_classification_metrics(p, l) for s, (p, l) in sorted(by_setting.items())},
        "num_unparsable": len(unparsable),
        "unparsable": unparsable,
    }


def no_boxes(sample: EvalSample, record: dict) -> tuple[list, list]:
    """POPE pictures show the image with the answer as caption only."""
    return [], []


def build_parser() -> argparse.ArgumentParser:
    return task_parser(__doc__, data_help="POPE jsonl files (coco_pope_<setting>.json)",
                       images_help="folder of the COCO val2014 images")


def main(argv: list[str] | None = None, answer_fn: AnswerFn | None = None) -> dict:
    args = build_parser().parse_args(argv)
    loaded = load_samples(args.data, args.images)
    metrics = run_task("pope", loaded, score, args, answer_fn=answer_fn, boxes_fn=no_boxes)
    print(summary_line(metrics, ["num_answered", "num_unparsable", "missing_images"]))
    for setting, values in metrics["settings"].items():
        print(f"  {setting}: " + " ".join(f"{k}={values[k]:.4f}" for k in
                                          ("accuracy", "precision", "recall", "f1", "yes_ratio")))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
