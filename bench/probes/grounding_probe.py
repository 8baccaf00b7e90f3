"""Quick grounding / naming probe of a trained model on validation scenes (issue 13, requirement 3).

    python bench/probes/grounding_probe.py --model-path checkpoints/probe/hf --data data/synth --scenes 60

For every object of the first `--scenes` scenes of `--split` (val by default; never test): asks
"What is the location of the <name> in the image?" (the RefCOCO wording) and scores the first box
of the answer. Reports, beside Acc@0.5 (IoU >= 0.5 with the object):
  * floor: Acc@0.5 of always answering the median training box (what an LLM that ignores the
    image can reach);
  * any_object: share of answer boxes with IoU >= 0.5 with *any* object of the scene (a model that
    looks at the image but binds the wrong name scores here, not in Acc@0.5);
  * mean_iou on the asked object; miss_near / miss_other_object: answers with IoU 0.1-0.5 on the
    asked object (found, box coarse) / below 0.5 on it but >= 0.5 on another object (wrong object);
  * name_box: naming with a box region ("What is the object <region>?"), colour and shape right;
  * restated_name: grounding answers ("The <name> [box].") that restate the asked name, and
    acc50_restated: Acc@0.5 among those (the box is written after the name, so a wrong name there
    sends the box elsewhere); restated_other_object: answers that restate, instead, the name of
    another object of the scene (the name read from the image rather than copied from the question);
    restated_colour / restated_shape: answers whose restated colour / shape word is the asked one;
  * coordinate_abs_error_px: mean |answer - truth| of each coordinate in image pixels, and
    near_miss_worst_coordinate: among the near misses, the share whose worst coordinate is each one
    (each coordinate has its own head in layer 2: one head binding late shows here, session 29).
The training loss hides a model that writes an average box; these numbers do not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ferret.eval.common import write_json
from ferret.eval.metrics import box_iou
from ferret.eval.synthetic_direct import REFER_QUESTION, first_name
from ferret.regions import Box

GROUND_QUESTION = "What is the location of the {name} in the image?"


COORDINATES = ("x1", "y1", "x2", "y2")


def median_box(records: list[dict]) -> tuple[float, float, float, float]:
    """The median object box on the 0-1 scale (x1, y1, x2, y2) of training scenes."""
    boxes = np.array([[o["box"][0] / r["width"], o["box"][1] / r["height"], o["box"][2] / r["width"],
                       o["box"][3] / r["height"]] for r in records for o in r["objects"]])
    return tuple(np.median(boxes, axis=0).tolist())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--split", default="val", choices=["val", "ood"])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat

    data = Path(args.data)
    scenes = json.loads((data / f"scenes_{args.split}.json").read_text())[: args.scenes]
    train = json.loads((data / "scenes_train.json").read_text())[:2000] if (data / "scenes_train.json").exists() else scenes
    mx1, my1, mx2, my2 = median_box(train)
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    start = time.perf_counter()
    asks, truths = [], []
    for scene in scenes:
        image = str(data / scene["image"])
        for obj in scene["objects"]:
            asks.append((image, GROUND_QUESTION.format(name=obj["name"]), ()))
            asks.append((image, REFER_QUESTION, (Box(*map(float, obj["box"])),)))
            truths.append((scene, obj))
    answers = []
    for i in range(0, len(asks), args.batch_size):
        answers += chat.ask_batch(asks[i:i + args.batch_size], max_new_tokens=32)
    hits = anys = floors = names = near = other = restated = restated_hits = restated_other = 0
    restated_words = np.zeros(2)
    coordinate_errors, worst_in_near = [], np.zeros(4)
    ious = []
    examples = []
    for k, (scene, obj) in enumerate(truths):
        ground, refer = answers[2 * k], answers[2 * k + 1]
        boxes = [r.box for r in ground.regions if r.box is not None]
        w, h = scene["width"], scene["height"]
        floor = (mx1 * w, my1 * h, mx2 * w, my2 * h)
        floors += box_iou(floor, tuple(obj["box"])) >= 0.5
        if boxes:
            box = tuple(boxes[0])
            own = box_iou(box, tuple(obj["box"]))
            best = max(box_iou(box, tuple(o["box"])) for o in scene["objects"])
            hits += own >= 0.5
            if first_name(ground.text) == obj["name"]:
                restated_hits += own >= 0.5
            anys += best >= 0.5
            near += 0.1 <= own < 0.5  # the asked object, coarsely
            error = np.abs(np.subtract(box, obj["box"]))
            coordinate_errors.append(error)
            if 0.1 <= own < 0.5:
                worst_in_near[int(error.argmax())] += 1
            other += own < 0.5 <= best  # another object of the scene
            ious.append(own)
        else:
            ious.append(0.0)
        names += first_name(refer.text) == obj["name"]
        said = first_name(ground.text)
        restated += said == obj["name"]
        restated_other += said != obj["name"] and said in {o["name"] for o in scene["objects"]}
        if said is not None:
            restated_words += [a == b for a, b in zip(said.split(), obj["name"].split())]
        if len(examples) < 6:
            examples.append({"name": obj["name"], "truth": obj["box"], "ground": ground.text, "refer": refer.text})
    n = len(truths)
    result = {"model_path": args.model_path, "split": args.split, "scenes": len(scenes), "objects": n,
              "acc50": round(hits / n, 4), "any_object": round(anys / n, 4), "floor": round(floors / n, 4),
              "mean_iou": round(sum(ious) / n, 4), "miss_near": round(near / n, 4), "miss_other_object": round(other / n, 4),
              "name_box": round(names / n, 4), "restated_name": round(restated / n, 4),
              "acc50_restated": round(restated_hits / max(restated, 1), 4),
              "restated_other_object": round(restated_other / n, 4),
              "restated_colour": round(restated_words[0] / n, 4), "restated_shape": round(restated_words[1] / n, 4),
              "coordinate_abs_error_px": dict(zip(COORDINATES, np.mean(coordinate_errors, axis=0).round(2).tolist()))
              if coordinate_errors else None,
              "near_miss_worst_coordinate": dict(zip(COORDINATES, (worst_in_near / max(near, 1)).round(3).tolist())),
              "seconds": round(time.perf_counter() - start, 1), "examples": examples}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
