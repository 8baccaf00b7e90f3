"""How a model's LVIS-style two-way answers fail, read from a val report it already wrote (no model run).

`ferret.eval.synthetic_report` scores the choice "Is the object <region> a pink circle or a pink
cross?" as right or wrong; this sorts every answer into: the asked name, the other offered name, or
neither; for neither, whether its colour and its shape were offered, and whether it names another
object of the scene (a read of the wrong object) or no object at all.

  python bench/probes/lvis_answer_kinds.py runs/val_full_RUN/report [more reports] \
      [--scenes data/synth/scenes_val.json] [--out results/lvis_kinds.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

from ferret.eval.common import write_json

ARTICLE = re.compile(r"^(a|an|the)\s+")


def answer_name(text: str) -> str:
    """"A pink cross." -> "pink cross"."""
    return " ".join(ARTICLE.sub("", text.strip().lower().rstrip(".")).split())


def answer_kind(answer: str, name: str, other: str, scene_names: set[str]) -> list[str]:
    """The counters one answer adds to: its kind, and for neither offered name, where its words come from."""
    if answer == name:
        return ["right"]
    if answer == other:
        return ["other offered name"]
    words = answer.split()
    if len(words) != 2:
        return ["neither", "neither: not a colour and a shape"]
    colour, shape = words
    kinds = ["neither",
             "neither: colour " + ("offered" if colour in (name.split()[0], other.split()[0]) else "not offered"),
             "neither: shape " + ("offered" if shape in (name.split()[1], other.split()[1]) else "not offered"),
             "neither: names " + ("another object of the scene" if answer in scene_names else "no object of the scene")]
    if colour not in (name.split()[0], other.split()[0]):
        scene_colours = {n.split()[0] for n in scene_names if n != name}
        kinds.append("colour not offered: " + ("another object's" if colour in scene_colours else "no object's"))
    return kinds


def report_kinds(report: Path, scenes: dict[str, set[str]]) -> dict:
    questions = {}
    for line in open(report / "benchmarks" / "lvis_synthetic_eval.jsonl"):
        q = json.loads(line)
        questions[q["id"]] = q
    counts: dict[str, collections.Counter] = {"box": collections.Counter(), "point": collections.Counter()}
    for line in open(report / "lvis" / "predictions_0_of_1.jsonl"):
        p = json.loads(line)
        index, prompt = p["id"].split(":")
        q = questions[int(index)]
        counts[prompt]["answers"] += 1
        counts[prompt].update(answer_kind(answer_name(p["text"]), q["name"], q["neg_class"], scenes[q["image_path"]]))
    return {prompt: {k: {"count": v, "share": round(v / c["answers"], 4)} for k, v in sorted(c.items())}
            for prompt, c in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="synthetic_report output folders")
    parser.add_argument("--scenes", default="data/synth/scenes_val.json")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    scenes = {s["image"]: {o["name"] for o in s["objects"]} for s in json.load(open(args.scenes))}
    result = {str(report): report_kinds(report, scenes) for report in args.reports}
    for report, prompts in result.items():
        print(report)
        for prompt, kinds in prompts.items():
            for kind, v in kinds.items():
                print(f"  {prompt:5s} {kind:55s} {v['count']:5d} {v['share']:.3f}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
