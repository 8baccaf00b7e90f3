"""Does a model name a boxed object from its `<region_fea>` token? (issue 13)

    python bench/probes/region_ablation.py --model-path ferret/assets/model --scenes 20

Asks the naming question ("What is the object <region>?", the object's box) for every object of
the first `--scenes` validation scenes, once as is and once with the region sampler's output zeroed
by a forward hook, and prints colour-and-shape and colour-only accuracy of both. Validation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--scenes", type=int, default=20)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat
    from ferret.eval.synthetic_direct import REFER_QUESTION, first_name
    from ferret.regions import Box

    data = Path(args.data)
    scenes = json.loads((data / "scenes_val.json").read_text())[: args.scenes]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    asks, truths = [], []
    for scene in scenes:
        for obj in scene["objects"]:
            asks.append((str(data / scene["image"]), REFER_QUESTION, (Box(*map(float, obj["box"])),)))
            truths.append(obj)

    def accuracy() -> dict:
        answers = []
        for i in range(0, len(asks), 16):
            answers += chat.ask_batch(asks[i:i + 16], max_new_tokens=12)
        names = [first_name(a.text) or "" for a in answers]
        return {"both": round(sum(n == o["name"] for n, o in zip(names, truths)) / len(truths), 3),
                "colour": round(sum(n.split(" ")[0] == o["color"] for n, o in zip(names, truths)) / len(truths), 3)}

    result = {"model": args.model_path, "objects": len(truths), "as_is": accuracy()}
    hook = chat.model.model.region_module.register_forward_hook(
        lambda _m, _i, out: [None if x is None else torch.zeros_like(x) for x in out])
    result["region_zeroed"] = accuracy()
    hook.remove()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
