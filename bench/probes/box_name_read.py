"""Does the input of the box heads' layer hold the box's name where the box is written?
(issue 13, session 41: a draw whose x1 coordinate head matched the shape alone had no head of the
layers below reading the colour at the "[" that writes x1; `train.box_name_readout_weight` asks for
the name there.)

    python bench/probes/box_name_read.py --model-path checkpoints/repro_s35/hf --scenes 60

For each object of the first `--scenes` validation scenes, teacher-forces "What is the location of
the <name> in the image?" "The <name> [x1, y1, x2, y2]." and reads, at each position that writes
one of the four numbers, the colour and the shape from the input of `--layer` (after its norm) on
the names' word embeddings, as the training readout (ferret.training.grounding.BoxNameReadout)
does. Prints, per coordinate, the share of objects whose colour / shape / both read right.
A model trained without the readout may hold the name in other directions than the words': a
low share then says "not on the words' axes", not "absent". Validation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

COORDINATES = ("x1", "y1", "x2", "y2")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat
    from ferret.processing import load_image
    from ferret.regions import Box, format_region
    from ferret.training.dense_supervision import NameDirections, class_logits
    from ferret.training.grounding import BoxNameReadout, spliced_index

    data = Path(args.data)
    scenes = json.loads((data / "scenes_val.json").read_text())[: args.scenes]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    model = chat.model.float()
    readout = BoxNameReadout(model, chat.tokenizer, args.layer)
    directions = NameDirections.of_module(readout.embeddings, readout.token_ids)
    right = {c: [] for c in COORDINATES}  # per object: (colour right, shape right)
    for scene in scenes:
        picture = load_image(str(data / scene["image"]))
        width, height = picture.size
        for obj in scene["objects"]:
            question = f"What is the location of the {obj['name']} in the image?"
            answer = f"The {obj['name']} {format_region(Box(*obj['box']), width, height, with_token=False)}."
            sample = chat.processor.encode(picture, [("USER", question), ("ASSISTANT", answer)], [])
            batch = chat.collator([sample])
            ids, labels = batch["input_ids"][0], batch["labels"][0]
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      images=batch["pixel_values"].float())
            hidden, readout.captured = readout.captured, None
            found = readout.queries(ids, labels)
            if len(found) != len(COORDINATES):
                raise RuntimeError(f"scene {scene.get('id')}: {len(found)} number positions, expected 4")
            _, to_spliced = spliced_index(ids, readout.num_image_tokens)
            colour, shape = class_logits(hidden[0, [to_spliced(j) for j, _, _ in found]], directions)
            for c, (name, (_, want_colour, want_shape)) in enumerate(zip(COORDINATES, found)):
                right[name].append((int(colour[c].argmax()) == want_colour, int(shape[c].argmax()) == want_shape))
    result = {"model": args.model_path, "layer": args.layer, "objects": len(right["x1"])}
    for name, pairs in right.items():
        n = len(pairs)
        result[name] = {"colour": sum(a for a, _ in pairs) / n, "shape": sum(b for _, b in pairs) / n,
                        "both": sum(a and b for a, b in pairs) / n}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
