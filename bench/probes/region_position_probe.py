"""Does a referred region's embedding say where its object is? (issue 13, session 44: an object
with a colour twin is named wrong twice as often, and the heads that read the object take the twin;
the region embedding is trained to say what its object is, never where.)

    python bench/probes/region_position_probe.py --model-path ferret/assets/model --scenes 400 \
        --out bench/probes/results/region_position/shipped.json

For every object of the first `--scenes` val scenes, with its box as the region (as the naming
checks ask): the region embedding (the `<region_fea>` input of the LLM) and the mean of the
projected image tokens over the object's cells. A ridge regression, fitted on the first half of the
scenes and scored on the second, reads the object's box centre (x, y, 0-1 of the image) off each.
`r2` is the share of the centre's variance it explains (0: no better than the mean; 1: exact);
`twin_gap` is, for the objects with a colour twin, the share of held-out regions whose predicted
centre lies nearer the twin's centre than the object's own: could a query built from the embedding
tell the twins apart by position? Also the box code (the image tokens' number-row readout) decoded
off the region embedding, as `box_code_acc50` (IoU >= 0.5 with the object's box): the readout that
`train.region_box_code_weight` would train. Validation only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ferret.eval.common import write_json


def ridge_fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge regression with a bias, closed form."""
    mean_x, mean_y = train_x.mean(0), train_y.mean(0)
    x = train_x - mean_x
    weights = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ (train_y - mean_y))
    return (test_x - mean_x) @ weights + mean_y


def r2(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Share of the variance of truth [M, k] explained (summed over the k outputs)."""
    residual = ((predicted - truth) ** 2).sum()
    total = ((truth - truth.mean(0)) ** 2).sum()
    return float(1 - residual / total) if total > 0 else float("nan")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from ferret.chat import FerretChat
    from ferret.data.synthetic_tokenizer import number_token_ids
    from ferret.eval.metrics import box_iou
    from ferret.processing import build_question, load_image
    from ferret.regions import Box, pixel_to_grid
    from ferret.training.dense_supervision import ScenePatchTargets
    from ferret.training.grounding import box_code_logits

    data = Path(args.data)
    scenes = json.loads((data / "scenes_val.json").read_text())[: args.scenes]
    chat = FerretChat.from_pretrained(args.model_path, device="cpu")
    model = chat.model
    cells = ScenePatchTargets(scenes, model.get_vision_tower().grid_size)
    ids = number_token_ids(chat.tokenizer)
    rows = model.get_output_embeddings().weight[torch.tensor(ids)].detach() if ids is not None else None
    records = []  # per object: scene index, centre, twin centre or None, region vector, token vector, code box
    for s, scene in enumerate(scenes):
        picture = load_image(str(data / scene["image"]))
        width, height = picture.size
        for index, obj in enumerate(scene["objects"]):
            box = Box(*obj["box"])
            question = build_question("What is the object <region>?", [box], width, height)
            sample = chat.processor.encode(picture, [("USER", question), ("ASSISTANT", "A")], [box], return_labels=False)
            batch = chat.collator([sample])
            with torch.no_grad():
                features, tokens = model.encode_images(batch["pixel_values"])
                region = model.encode_regions(features, batch["region_masks"],
                                              generator=torch.Generator().manual_seed(0))[0][0]
            own = cells._cells_of(int(scene["scene_id"]), index)
            token = tokens[0, -own.shape[0]:][own].mean(0)

            def centre(b):
                return [(b[0] + b[2]) / 2 / width, (b[1] + b[3]) / 2 / height]

            twins = [centre(o["box"]) for k, o in enumerate(scene["objects"])
                     if k != index and o["color"] == obj["color"]]
            code = None
            if rows is not None:
                decoded = box_code_logits(region[None].float(), rows.float())[0].argmax(-1).tolist()
                code = (decoded, [pixel_to_grid(obj["box"][0], width), pixel_to_grid(obj["box"][1], height),
                                  pixel_to_grid(obj["box"][2], width), pixel_to_grid(obj["box"][3], height)])
            records.append((s, centre(obj["box"]), twins[0] if twins else None, region.float().numpy(),
                            token.float().numpy(), code))
    half = args.scenes // 2
    train = [r for r in records if r[0] < half]
    test = [r for r in records if r[0] >= half]
    truth = np.array([r[1] for r in test])
    result = {"model": args.model_path, "scenes": len(scenes), "objects": len(records),
              "held_out_objects": len(test), "held_out_twins": sum(r[2] is not None for r in test)}
    for name, slot in (("region_embedding", 3), ("image_tokens_on_object", 4)):
        predicted = ridge_fit_predict(np.stack([r[slot] for r in train]), np.array([r[1] for r in train]),
                                      np.stack([r[slot] for r in test]), args.alpha)
        error = np.abs(predicted - truth).mean()
        twin_rows = [i for i, r in enumerate(test) if r[2] is not None]
        nearer_twin = [float(np.linalg.norm(predicted[i] - np.array(test[i][2]))
                             < np.linalg.norm(predicted[i] - truth[i])) for i in twin_rows]
        result[name] = {"r2": round(r2(predicted, truth), 4), "mean_abs_error": round(float(error), 4),
                        "twin_gap": round(float(np.mean(nearer_twin)), 4) if nearer_twin else None}
    if rows is not None:
        hits = [box_iou(tuple(r[5][0]), tuple(r[5][1])) >= 0.5 for r in records]
        result["region_box_code_acc50"] = round(float(np.mean(hits)), 4)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
