"""Where does a trained model lose an object's shape? (issue 13: the coordinate-head run names by
colour alone.)

    python bench/probes/token_probe.py --model-path checkpoints/full_coordpe/hf --scenes 100

On the first `--scenes` validation scenes, for every object (its cells as in tower_probe.py: the
cells it owns with >= 20 % cover, else its most covered cell), reads colour and shape out of the
model's image tokens at each depth, object-level (logits averaged over the object's cells):

* `projected/own`: the projector's output on the dense readout's dedicated channels;
* `projected/names`: the same tokens projected on the names' word embeddings (what the dense
  loss teaches the LLM to read);
* `layer_k/lm_head`: the hidden state of the image tokens after decoder layer k (image alone
  after BOS, as in a prompt), through the final norm and the LM head, restricted to the colour
  and shape name tokens: does the name survive the LLM's layers?
* `box_code`: the box the number rows read from the projected tokens (box code runs only);
* `region/own`, `region/names`: the region sampler's embedding of the object's box (the
  `<region_fea>` input of a naming question), read like the tokens.

Also the norm of the projected tokens and of their name-direction component. Validation only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ferret.eval.common import write_json
from ferret.eval.metrics import box_iou
from ferret.regions import pixel_to_grid
from ferret.training.dense_supervision import BOX_CHANNELS, DenseVocabulary, NameDirections, class_logits

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tower_probe.py beside this script
from tower_probe import SceneBatches, decode_box_code, load_records, object_cells


def object_cell_sets(record: dict, grid: int) -> list[torch.Tensor]:
    stacked = np.stack(object_cells(record, grid))
    owner = stacked.argmax(0)
    out = []
    for k in range(len(record["objects"])):
        cells = np.nonzero((owner == k) & (stacked[k] >= 0.2))[0]
        out.append(torch.from_numpy(cells if len(cells) else np.array([int(stacked[k].argmax())])))
    return out


@torch.no_grad()
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ferret.model  # noqa: F401  (registers the Ferret classes with the Auto factories)

    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    vocabulary = DenseVocabulary.synthetic()
    color_ids, shape_ids = NameDirections.token_ids(tokenizer, vocabulary)
    directions = NameDirections.from_embeddings(model.get_input_embeddings().weight, (color_ids, shape_ids))
    tower = model.get_vision_tower()
    size, grid = tower.config.image_size, tower.grid_size
    records = load_records(Path(args.data), "val")[: args.scenes]
    batches = SceneBatches(Path(args.data), records, size, grid, vocabulary)
    from ferret.data.synthetic_tokenizer import number_token_ids

    numbers = number_token_ids(tokenizer)
    rows = model.get_output_embeddings().weight[torch.tensor(numbers)] if numbers is not None else None
    nc = vocabulary.num_colors
    layers = model.config.num_hidden_layers
    readers = ["projected/own", "projected/names", "region/own", "region/names"] + [f"layer_{k}/lm_head" for k in range(1, layers + 1)]
    right = {r: {"color": 0, "shape": 0} for r in readers}
    coded = total = 0
    norms, name_norms = [], []
    bos = model.get_input_embeddings().weight[tokenizer.bos_token_id][None, None]
    name_rows = model.get_output_embeddings().weight[torch.tensor(color_ids + shape_ids)]
    for start in range(0, len(records), 32):
        indices = list(range(start, min(start + 32, len(records))))
        pixels, _ = batches.batch(indices)
        features, tokens = model.encode_images(pixels)  # [B, N, hidden]
        boxes = []
        for index in indices:
            record = records[index]
            masks = []
            for obj in record["objects"]:
                mask = torch.zeros(int(record["width"]), int(record["height"]), dtype=torch.bool)
                x1, y1, x2, y2 = (int(v) for v in obj["box"])
                mask[x1:x2 + 1, y1:y2 + 1] = True
                masks.append(mask)
            boxes.append(masks)
        regions = model.encode_regions(features, boxes, generator=torch.Generator().manual_seed(0))
        embeds = torch.cat([bos.expand(len(indices), 1, -1), tokens], dim=1)
        out = model.model(inputs_embeds=embeds, output_hidden_states=True)
        hidden = out.hidden_states
        last_normed = torch.allclose(hidden[-1], out.last_hidden_state)
        per_layer = {}
        for k in range(1, layers + 1):
            state = hidden[k][:, 1:]
            normed = state if (k == layers and last_normed) else model.model.norm(state)
            logits = normed @ name_rows.T
            zero = logits.new_full(logits.shape[:-1] + (1,), -1e9)
            per_layer[f"layer_{k}/lm_head"] = (torch.cat([zero, logits[..., :len(color_ids)]], -1),
                                               torch.cat([zero, logits[..., len(color_ids):]], -1))
        own = tokens[..., BOX_CHANNELS:]
        per_layer["projected/own"] = (own[..., :nc], own[..., nc:nc + vocabulary.num_shapes])
        per_layer["projected/names"] = class_logits(tokens, directions)
        for row, index in enumerate(indices):
            record = records[index]
            region_own = regions[row][:, BOX_CHANNELS:]
            region_logits = {"region/own": (region_own[:, :nc], region_own[:, nc:nc + vocabulary.num_shapes]),
                             "region/names": class_logits(regions[row], directions)}
            for j, (obj, cells) in enumerate(zip(record["objects"], object_cell_sets(record, grid))):
                truth = (vocabulary.colors.index(obj["color"]) + 1, vocabulary.shapes.index(obj["shape"]) + 1)
                for reader, (color_logits, shape_logits) in region_logits.items():
                    right[reader]["color"] += int(color_logits[j][1:].argmax()) + 1 == truth[0]
                    right[reader]["shape"] += int(shape_logits[j][1:].argmax()) + 1 == truth[1]
                for reader, (color_logits, shape_logits) in per_layer.items():
                    right[reader]["color"] += int(color_logits[row, cells].mean(0)[1:].argmax()) + 1 == truth[0]
                    right[reader]["shape"] += int(shape_logits[row, cells].mean(0)[1:].argmax()) + 1 == truth[1]
                vectors = tokens[row, cells]
                norms.append(float(vectors.norm(dim=-1).mean()))
                name_part = torch.cat([vectors @ directions.color.T, vectors @ directions.shape.T], -1)
                name_norms.append(float(name_part.abs().max(-1).values.mean()))
                if rows is not None:
                    box = [pixel_to_grid(v, s) for v, s in zip(obj["box"], (record["width"], record["height"]) * 2)]
                    coded += box_iou(tuple(decode_box_code(vectors, rows)), tuple(box)) >= 0.5
                total += 1
    result = {"model": args.model_path, "scenes": len(records), "objects": total,
              "readout": {r: {k: v / total for k, v in c.items()} for r, c in right.items()},
              "token_norm": float(np.mean(norms)), "largest_name_projection": float(np.mean(name_norms))}
    if rows is not None:
        result["box_code_acc50"] = coded / total
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
