"""Where does the head trained for yes/no look? (issue 13: the coordinate-head runs say "Yes" to absent objects.)

    python bench/probes/presence_probe.py --model-path checkpoints/full_coordpe_v2/hf --scenes 30

For the first `--scenes` validation scenes asks "Is there a X in the image?" once for a present
object and once for an absent name, and reads each attention head of `--layer` at the position
that writes the answer's first word: its mass on the BOS token and on the image tokens, averaged
per head. Training pushes the presence head (`train.attention_supervision_head` of that layer)
onto the asked object when it is present and onto BOS when it is not, so a head that does its job
shows a clearly higher BOS mass for absent names than for present ones; `absent_colour` asks for an
absent name whose colour the scene has, where a head that matches on colour alone looks at the
same-coloured object instead of BOS. Validation only.

`layers` in the output repeats this for every layer and adds each head's mass on the question's
colour and shape tokens: a head there must bring the asked name to the answer position, or the
presence head's query cannot depend on it (then its attention is the same for present and absent).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ferret.eval.common import write_json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat
    from ferret.data.synthetic import COLORS, SHAPES
    from ferret.training.grounding import spliced_index

    data = Path(args.data)
    scenes = json.loads((data / "scenes_val.json").read_text())[: args.scenes]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    model = chat.model
    model.config._attn_implementation = "eager"  # sdpa returns no attention weights
    n_image = model.get_vision_tower().num_patches
    rng = random.Random(0)
    words = set(COLORS) | set(SHAPES)
    # per question: [layers, 5 (bos, image, name = its colour word + its shape word), heads]
    # "absent_colour": an absent name whose colour a present object has (the yes/no answers' commonest
    # mistake); drawn after the others so "present"/"absent" stay the questions of earlier results.
    masses = {"present": [], "absent": [], "absent_colour": []}
    for scene in scenes:
        names = {o["name"] for o in scene["objects"]}
        absent = rng.choice([f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in names])
        colours = sorted({o["color"] for o in scene["objects"]})
        absent_colour = rng.choice([f"{c} {s}" for c in colours for s in SHAPES if f"{c} {s}" not in names])
        for kind, name in (("present", scene["objects"][0]["name"]), ("absent", absent),
                           ("absent_colour", absent_colour)):
            request = chat._prepare(str(data / scene["image"]), f"Is there a {name} in the image?")
            inputs = chat._batch_inputs([request])
            inputs.pop("region_generator")
            with torch.no_grad():
                attentions = model(**inputs, output_attentions=True).attentions
            ids = inputs["input_ids"][0]
            start, to_spliced = spliced_index(ids, n_image)
            tokens = chat.tokenizer.convert_ids_to_tokens([max(int(i), 0) for i in ids])
            asked = [to_spliced(j) for j, tok in enumerate(tokens) if tok.lstrip("▁Ġ ") in words][-2:]
            rows = []
            for layer in attentions:
                attention = layer[0, :, -1]  # [heads, keys] at the position that writes the answer's first word
                rows.append(torch.stack([attention[:, 0], attention[:, start:start + n_image].sum(-1),
                                         attention[:, asked].sum(-1), attention[:, asked[0]], attention[:, asked[-1]]]))
            masses[kind].append(torch.stack(rows))
    result = {"model": args.model_path, "layer": args.layer, "scenes": len(scenes)}
    mean = {kind: torch.stack(rows).mean(0) for kind, rows in masses.items()}

    def table(kind, layer, parts=("bos", "image")):
        return {part: [round(float(v), 3) for v in mean[kind][layer, k]] for k, part in enumerate(parts)}

    for kind in masses:
        result[kind] = table(kind, args.layer)
    result["layers"] = [{kind: table(kind, layer, ("bos", "image", "name", "colour_word", "shape_word")) for kind in masses}
                        for layer in range(len(mean["present"]))]
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
