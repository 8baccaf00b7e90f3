"""Direct checks of the embedded model on the synthetic test split (what the benchmarks leave out).

    python -m ferret.eval.synthetic_direct --data data/synth --out ferret/assets/model/eval [--model-path PATH]

For the first `--max-scenes` test scenes (`scenes_test.json`) and every object in them:
  * referring classification: "What is the object <region>?" with the object as a box (its
    tight box), a point (a random visible pixel) and a free-form scribble (drawn on the object
    by the synthetic world's own `scribble_mask`); right when the first object name the answer
    writes is the object's;
  * yes/no questions "Is there a <name> in the image?" (the POPE wording) for up to two absent
    names (right answer: no) and two present ones (yes), read with POPE's first-sentence rule.
Grounding is measured by `python -m ferret.eval.synthetic_report` (RefCOCO Acc@0.5). Everything
random follows from `--seed`. Writes `direct_checks.json` (metrics and every wrong answer).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from ferret.data.rle import decode_rle
from ferret.data.synthetic import COLORS, SHAPES, SceneObject, scribble_mask
from ferret.eval.metrics import parse_yes_no
from ferret.regions import Box, FreeForm, Point

REFER_QUESTION = "What is the object <region>?"
POPE_QUESTION = "Is there a {name} in the image?"
ALL_NAMES = [f"{c} {s}" for c in COLORS for s in SHAPES]
_NAME_RE = re.compile(r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")


def first_name(text: str) -> str | None:
    """The first "<colour> <shape>" the text writes, None when there is none."""
    match = _NAME_RE.search(text.lower())
    return f"{match.group(1)} {match.group(2)}" if match else None


def scene_questions(scene: dict, images_dir: Path, rng: np.random.Generator) -> list[dict]:
    """All questions about one scene: (image, question, regions) plus what is expected."""
    width, height = scene["width"], scene["height"]
    image = str(images_dir / scene["image"])
    questions = []
    for obj in scene["objects"]:
        mask = decode_rle(obj["mask"], (height, width))
        ys, xs = np.nonzero(mask)
        x1, y1, x2, y2 = obj["box"]
        pick = int(rng.integers(len(xs)))
        radius = max(x2 - x1, y2 - y1) / 2.0
        scene_obj = SceneObject(obj["color"], obj["shape"], obj["size"], radius, mask, tuple(obj["box"]))
        regions = {
            "box": Box(float(x1), float(y1), float(x2), float(y2)),
            "point": Point(float(xs[pick]), float(ys[pick])),
            "free_form": FreeForm(scribble_mask(scene_obj, rng, width, height)),
        }
        for kind, region in regions.items():
            questions.append({"check": f"refer_{kind}", "image": image, "question": REFER_QUESTION,
                              "regions": (region,), "expected": obj["name"]})
    present = sorted({o["name"] for o in scene["objects"]})
    absent = [n for n in ALL_NAMES if n not in present]
    for name in [present[i] for i in rng.permutation(len(present))[:2]]:
        questions.append({"check": "yes_no_present", "image": image, "question": POPE_QUESTION.format(name=name),
                          "regions": (), "expected": "yes"})
    for name in [absent[i] for i in rng.permutation(len(absent))[:2]]:
        questions.append({"check": "yes_no_absent", "image": image, "question": POPE_QUESTION.format(name=name),
                          "regions": (), "expected": "no"})
    return questions


def is_right(question: dict, text: str) -> bool:
    if question["check"].startswith("refer_"):
        return first_name(text) == question["expected"]
    return parse_yes_no(text) == question["expected"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="synthetic world folder (scenes_test.json, images/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-path", default=None, help="model folder; default: the embedded model")
    parser.add_argument("--max-scenes", type=int, default=40, help="first N test scenes (0: all)")
    parser.add_argument("--split", default="test", choices=["test", "val", "ood"], help="which held-out scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from ferret.chat import FerretChat
    from ferret.eval.common import read_json_file, write_json

    start = time.perf_counter()
    data = Path(args.data)
    scenes = read_json_file(data / f"scenes_{args.split}.json")
    scenes = scenes[:args.max_scenes] if args.max_scenes else scenes
    rng = np.random.default_rng([args.seed, 31])
    questions = [q for scene in scenes for q in scene_questions(scene, data, rng)]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    answers = []
    for i in range(0, len(questions), args.batch_size):
        chunk = questions[i:i + args.batch_size]
        answers += [a.text for a in chat.ask_batch([(q["image"], q["question"], q["regions"]) for q in chunk],
                                                   max_new_tokens=24)]
    results: dict[str, list[bool]] = {}
    wrong = []
    for q, text in zip(questions, answers):
        right = is_right(q, text)
        results.setdefault(q["check"], []).append(right)
        if not right:
            wrong.append({"check": q["check"], "image": Path(q["image"]).name, "question": q["question"],
                          "expected": q["expected"], "answer": text})
    yes_no = results.get("yes_no_present", []) + results.get("yes_no_absent", [])
    report = {
        "data": str(data), "split": args.split, "model_path": args.model_path, "num_scenes": len(scenes),
        "seed": args.seed,
        "accuracy": {check: round(float(np.mean(v)), 4) for check, v in sorted(results.items())},
        "counts": {check: len(v) for check, v in sorted(results.items())},
        "yes_no_accuracy": round(float(np.mean(yes_no)), 4) if yes_no else None,
        "seconds": round(time.perf_counter() - start, 2),
        "wrong": wrong,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "direct_checks.json", report)
    print(json.dumps({k: report[k] for k in ("accuracy", "counts", "yes_no_accuracy", "seconds")}, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
