"""Where a model's naming goes wrong: error rates by object size and shape, and the shape swaps.

Reads `synthetic_direct`'s `direct_checks.json` (it lists every wrong answer) and the scene records
of the same split, so it runs in a second on any finished evaluation (issue 13):

    python bench/probes/naming_errors.py --checks runs/eval/test/direct_checks.json \
        --scenes data/synth/scenes_test.json --out bench/probes/results/naming_errors/RUN_test.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ferret.eval.common import write_json
from ferret.eval.synthetic_direct import first_name

NAMING_CHECKS = ("refer_box", "refer_point", "refer_free_form")
# Half the shorter side of an object's box as the model sees it (every image squashed to a square of
# this many pixels: the embedded model's 144), binned; session 16 found naming errors rise steeply
# under ~9 px, where the generator draws almost nothing (MODEL_CARD.md, run full_small).
INPUT_SIZE = 144
RADIUS_BINS_PX = (6, 9, 12, 15)
# How much the square input squashes the image (longer side / shorter side, binned): is keeping the
# aspect ratio (padding) a lever for naming? (session 34)
SQUASH_BINS = (1.25, 1.5, 1.75)
# Small objects of squashed canvases (radius < 9 px in the input, squash >= 1.5) are thin there:
# session 34 found the out-of-generator box errors concentrated on them.
THIN_SQUASH, THIN_RADIUS_PX = 1.5, 9
# Whether another object of the scene has the asked object's colour: such objects are named wrong
# twice as often, mostly with the twin's shape or a shape the scene lacks (session 44).
AXES = ("size", "shape", "input radius", "squash", "thin", "colour twin")  # what each error rate is split by
# Another object counts as "in" the asked object's box when this share of its own box or more lies
# inside it: does a wrong name come from a crowded box (the sampler pools the whole box) or from a
# misread of the object alone? (session 36)
IN_BOX_SHARE = 1 / 3


def squash_bin(width: int, height: int) -> str:
    """The image's squash-factor bin, e.g. "1.25-1.50x" (labels sort in order)."""
    factor = max(width, height) / min(width, height)
    low = 1.0
    for high in SQUASH_BINS:
        if factor < high:
            return f"{low:.2f}-{high:.2f}x"
        low = high
    return f"{low:.2f}+x"


def input_radius(box: list[float], width: int, height: int, input_size: int = INPUT_SIZE) -> float:
    """Half the shorter side of the object's box in the square input, in pixels."""
    x1, y1, x2, y2 = box
    return min((x2 - x1) * input_size / width, (y2 - y1) * input_size / height) / 2


def thin_bin(box: list[float], width: int, height: int, input_size: int = INPUT_SIZE) -> str:
    """Which of the four squash x size cells the object falls in, e.g. "squash >= 1.5, radius < 9 px"."""
    squash = max(width, height) / min(width, height) >= THIN_SQUASH
    small = input_radius(box, width, height, input_size) < THIN_RADIUS_PX
    return (f"squash {'>=' if squash else '<'} {THIN_SQUASH}, radius {'<' if small else '>='} {THIN_RADIUS_PX} px")


def input_radius_bin(box: list[float], width: int, height: int, input_size: int = INPUT_SIZE) -> str:
    """The object's input-space radius bin, e.g. "06-09 px" (labels sort in size order)."""
    radius = input_radius(box, width, height, input_size)
    low = 0
    for high in RADIUS_BINS_PX:
        if radius < high:
            return f"{low:02d}-{high:02d} px"
        low = high
    return f"{low:02d}+ px"


def share_inside(outer: list[float], inner: list[float]) -> float:
    """How much of box `inner` lies inside box `outer` (0-1)."""
    w = min(outer[2], inner[2]) - max(outer[0], inner[0])
    h = min(outer[3], inner[3]) - max(outer[1], inner[1])
    area = (inner[2] - inner[0]) * (inner[3] - inner[1])
    return max(w, 0) * max(h, 0) / area if area > 0 else 0.0


def neighbour_kind(said: str, obj: dict, others: list[dict]) -> str:
    """What a wrong name is, against the rest of the scene: another object's name (and where that
    object lies against the asked object's box), or a name the scene lacks (the asked object alone
    in its box or not)."""
    named = [o for o in others if o["name"] == said]
    if named:
        share = share_inside(obj["box"], named[0]["box"])
        where = "half or more in the box" if share >= 0.5 else "partly in the box" if share > 0 else "outside the box"
        return f"another object's name, {where}"
    crowded = any(share_inside(obj["box"], o["box"]) >= IN_BOX_SHARE for o in others)
    return f"a name not in the scene, {'another object in the box' if crowded else 'alone in the box'}"


def breakdown(checks: dict, scenes: list[dict], input_size: int = INPUT_SIZE) -> dict:
    """Per naming check: error rate by size, by shape and by radius in the model's input, what went
    wrong, what the wrong name is against the rest of the scene, the commonest shape swaps."""
    scene_objects = {Path(s["image"]).name: s["objects"] for s in scenes}
    objects = {(Path(s["image"]).name, o["name"]):
               {**o, "input radius": input_radius_bin(o["box"], s["width"], s["height"], input_size),
                "squash": squash_bin(s["width"], s["height"]),
                "thin": thin_bin(o["box"], s["width"], s["height"], input_size),
                "colour twin": "yes" if sum(p["color"] == o["color"] for p in s["objects"]) > 1 else "no"}
               for s in scenes for o in s["objects"]}
    totals = Counter()
    for obj in objects.values():
        for axis in AXES:
            totals[(axis, obj[axis])] += 1
    result = {}
    for check in NAMING_CHECKS:
        wrong = [w for w in checks["wrong"] if w["check"] == check]
        missing = [w for w in wrong if (w["image"], w["expected"]) not in objects]
        if missing:
            raise ValueError(f"{check}: {len(missing)} wrong answers name objects the scene records lack "
                             f"(first: {missing[0]['image']} {missing[0]['expected']!r}); wrong --scenes?")
        by = Counter()
        kinds = Counter()
        swaps = Counter()
        neighbours = Counter()
        for w in wrong:
            obj = objects[(w["image"], w["expected"])]
            for axis in AXES:
                by[(axis, obj[axis])] += 1
            said = first_name(w["answer"])  # the name the grader read: wrong means said != expected
            if said is None:
                kinds["no colour-and-shape name"] += 1
                continue
            neighbours[neighbour_kind(said, obj, [o for o in scene_objects[w["image"]]
                                                  if o["name"] != obj["name"]])] += 1
            colour, shape = said.split(" ")
            colour_right, shape_right = colour == obj["color"], shape == obj["shape"]
            kinds["shape wrong, colour right" if colour_right else
                  "colour wrong, shape right" if shape_right else "both wrong"] += 1
            if not shape_right:
                swaps[f"{obj['shape']} -> {shape}"] += 1
        result[check] = {
            "accuracy": checks["accuracy"][check],
            "wrong": len(wrong),
            "error_rate": {f"{axis} {value}": round(by[(axis, value)] / totals[(axis, value)], 4)
                           for axis, value in sorted(totals)},
            "objects": {f"{axis} {value}": totals[(axis, value)] for axis, value in sorted(totals)},
            "kinds": dict(kinds.most_common()),
            "neighbours": dict(neighbours.most_common()),
            "shape_swaps": dict(swaps.most_common(10)),
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", required=True, help="direct_checks.json of synthetic_direct")
    parser.add_argument("--scenes", required=True, help="scenes_<split>.json of the same split")
    parser.add_argument("--max-scenes", type=int, default=None,
                        help="the first N scenes only (those synthetic_direct --max-scenes N asked about)")
    parser.add_argument("--out", help="write the breakdown here as JSON")
    args = parser.parse_args(argv)
    checks = json.loads(Path(args.checks).read_text())
    scenes = json.loads(Path(args.scenes).read_text())[: args.max_scenes]
    try:
        result = {"checks": args.checks, "scenes": args.scenes, **breakdown(checks, scenes)}
    except ValueError as exc:
        parser.error(str(exc))
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
