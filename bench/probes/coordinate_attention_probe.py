"""Where does each coordinate head look while a grounding answer writes its box?
(issue 13, session 29: a second draw of the shipped recipe writes x1 15.9 px off, the other three
coordinates 3.4-6.6 px; is its x1 head looking elsewhere?)

    python bench/probes/coordinate_attention_probe.py --model-path checkpoints/full_embedded_s7/hf --scenes 30

For each object of the first `--scenes` validation scenes, asks "What is the location of the <name>
in the image?" with the true answer ("The <name> [x1, y1, x2, y2].") teacher-forced, and reads head
c of `--layer` (the coordinate heads: head c is trained to look at the object from the position
that writes number c) at the position that writes number c. Per head: its mass on the image
tokens, on the cells inside the object's box, on the cells of the other objects' boxes (not this
one's; and of those that share its colour / its shape), the share of objects it gives under half its mass, and the attention-weighted mean column (x1, x2) or
row (y1, y2) of the image cells minus the object's own centre, in grid cells (the image is resized
to the tower's square input, so a cell is 1/grid of the width or height). And where the heads'
queries get the name from: each head of the layers below, at the same positions, its mass on the
answer's colour word and on its shape word ("name_reads"; a coordinate head can only match both if
the residual at its position holds both). An object's cells are
those whose centre lies in its box, so an object smaller than a cell can have none and scores 0 on
every head of every model alike: compare heads and models, not the numbers with 1. Validation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ferret.eval.common import write_json

COORDINATES = ("x1", "y1", "x2", "y2")


def box_cells(box, width: int, height: int, grid: int) -> torch.Tensor:
    """[grid, grid] bool: the cells whose centre lies inside the box (image pixels)."""
    centres = (torch.arange(grid) + 0.5) / grid
    x1, y1, x2, y2 = box
    cols = (centres * width >= x1) & (centres * width <= x2)
    rows = (centres * height >= y1) & (centres * height <= y2)
    return rows[:, None] & cols[None, :]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat
    from ferret.processing import load_image
    from ferret.regions import Box, format_region
    from ferret.training.grounding import spliced_index

    data = Path(args.data)
    scenes = json.loads((data / "scenes_val.json").read_text())[: args.scenes]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    model = chat.model
    model.config._attn_implementation = "eager"  # sdpa returns no attention weights
    n_image = model.get_vision_tower().num_patches
    grid = int(round(n_image ** 0.5))
    rows = {c: [] for c in COORDINATES}  # per object: (image mass, object mass, offset from centre)
    reads = {c: [] for c in COORDINATES}  # per object: [layers below, heads, (colour word, shape word)]
    for scene in scenes:
        picture = load_image(str(data / scene["image"]))
        width, height = picture.size
        for obj in scene["objects"]:
            question = f"What is the location of the {obj['name']} in the image?"
            answer = f"The {obj['name']} {format_region(Box(*obj['box']), width, height, with_token=False)}."
            sample = chat.processor.encode(picture, [("USER", question), ("ASSISTANT", answer)], [],
                                           return_labels=False)
            batch = chat.collator([sample])
            ids = batch["input_ids"][0]
            with torch.no_grad():
                attentions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   images=batch["pixel_values"], output_attentions=True).attentions
            attention = attentions[args.layer][0]  # [heads, queries, keys] in spliced positions
            start, to_spliced = spliced_index(ids, n_image)
            tokens = chat.tokenizer.convert_ids_to_tokens([max(int(i), 0) for i in ids])
            numbers = [j for j, t in enumerate(tokens) if t.lstrip("▁").isdigit()][-4:]
            colour_at, shape_at = numbers[0] - 3, numbers[0] - 2  # "... <colour> <shape> [x1"
            if tokens[colour_at].lstrip("▁") != obj["color"] or tokens[shape_at].lstrip("▁") != obj["shape"]:
                raise ValueError(f"answer tokens {tokens[colour_at:numbers[0]]} do not end in {obj['name']!r} [")
            inside = box_cells(obj["box"], width, height, grid).reshape(-1)
            others, same_colour, same_shape = (torch.zeros_like(inside) for _ in range(3))
            for other in scene["objects"]:
                if other is not obj:
                    cells_of = box_cells(other["box"], width, height, grid).reshape(-1) & ~inside
                    others |= cells_of
                    same_colour |= cells_of if other["color"] == obj["color"] else torch.zeros_like(inside)
                    same_shape |= cells_of if other["shape"] == obj["shape"] else torch.zeros_like(inside)
            x1, y1, x2, y2 = obj["box"]
            centre = ((x1 + x2) / 2 / width * grid - 0.5, (y1 + y2) / 2 / height * grid - 0.5)
            for c, (name, at) in enumerate(zip(COORDINATES, numbers)):
                cells = attention[c, to_spliced(at - 1), start:start + n_image]  # the position that writes it
                reads[name].append(torch.stack([a[0, :, to_spliced(at - 1)][:, [to_spliced(colour_at), to_spliced(shape_at)]]
                                                for a in attentions[: args.layer]]))
                mass = float(cells.sum())
                weights = cells.reshape(grid, grid) / max(mass, 1e-9)
                along = weights.sum(0) if name[0] == "x" else weights.sum(1)  # over columns / rows
                mean_at = float((along * torch.arange(grid)).sum())
                rows[name].append((mass, float(cells[inside].sum()), float(cells[others].sum()),
                                   mean_at - centre[0 if name[0] == "x" else 1],
                                   float(cells[same_colour].sum()), float(cells[same_shape].sum())))
    result = {"model": args.model_path, "layer": args.layer, "scenes": len(scenes), "objects": len(rows["x1"]),
              "grid": grid}
    for name, values in rows.items():
        t = torch.tensor(values)
        result[name] = {"image_mass": round(float(t[:, 0].mean()), 3), "object_mass": round(float(t[:, 1].mean()), 3),
                        "other_objects_mass": round(float(t[:, 2].mean()), 3),
                        "same_colour_objects_mass": round(float(t[:, 4].mean()), 3),
                        "same_shape_objects_mass": round(float(t[:, 5].mean()), 3),
                        "objects_below_half_mass": round(float((t[:, 1] < 0.5).float().mean()), 3),
                        "mean_offset_from_centre_cells": round(float(t[:, 3].mean()), 2),
                        "mean_abs_offset_from_centre_cells": round(float(t[:, 3].abs().mean()), 2)}
    result["name_reads"] = {  # layer -> head -> coordinate -> [mass on the colour word, on the shape word]
        f"layer{layer}": {f"head{head}": {name: [round(float(v), 3) for v in torch.stack(reads[name]).mean(0)[layer, head]]
                                          for name in COORDINATES}
                          for head in range(reads["x1"][0].shape[1])}
        for layer in range(args.layer)}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
