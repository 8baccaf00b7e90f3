"""Tower-only probe (issue 13, requirement 1): can a vision tower, trained from scratch on the
synthetic world's dense targets alone (no LLM), tell each object's colour and shape?

    python bench/probes/tower_probe.py --data data/synth --minutes 6 --image-size 144 --strides 2,2,3,1

Per step: a batch of training scenes, the tower, a linear readout per grid cell (colour, shape,
box; the same targets as ferret.training.dense_supervision), cross-entropy + L1. Every `--eval-every`
steps, on the first `--val-scenes` validation scenes: object-level accuracy, where an object's
class is the argmax of the readout averaged over the cells it covers most (or, for an object that
wins no cell, the single cell it covers most), so every object counts, small ones included.
Prints a learning curve and writes it as JSON (`--out`). Also reports how many objects win no
cell at the chosen grid (objects the dense loss never supervises). `--ood data/ood` scores the
final tower the same way on the out-of-generator set too (`final_ood`), and `--val-data` scores
on another world's val split than the one trained on (a turned world against the default val).

`--box-code linear|mlp` adds the training's box code (ferret.training.grounding.box_code_loss):
each cell's 256-wide vector, made from the tower's features by a linear map (the embedded model's
projector) or a 2-layer MLP, must hold its object's x1, y1, x2, y2 in four 64-wide blocks that
the number tokens' smooth-code rows read. `box_code_acc50` decodes each coordinate as the argmax
of those rows over the object's cells (mean logits) and scores the box at IoU 0.5: can the
projected image tokens carry a box the LLM could copy?
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ferret.data.rle import decode_rle, encode_rle
from ferret.eval.metrics import box_iou
from ferret.training.dense_supervision import DenseVocabulary, patch_coverage, scene_patch_targets
from ferret.training.grounding import BOX_COORDINATES, box_code_logits, box_code_loss, smooth_number_code
from ferret.regions import pixel_to_grid
from ferret.model.vision_tower import ConvVisionConfig, ConvVisionTower
from ferret.processing import CLIP_MEAN, build_image_processor


def load_records(data: Path, split: str) -> list[dict]:
    return json.loads((data / f"scenes_{split}.json").read_text())


def pad_scene(image: Image.Image, record: dict) -> tuple[Image.Image, dict]:
    """The image on a square canvas of its longer side (top-left, the rest in the CLIP mean
    colour) and its record in that canvas's pixels: what a tower sees when the aspect ratio is
    kept (LLaVA's `pad`) instead of squashed (Ferret's `square_nocrop`)."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(round(255 * m)) for m in CLIP_MEAN))
    canvas.paste(image, (0, 0))
    objects = []
    for obj in record["objects"]:
        mask = np.zeros((side, side), dtype=bool)
        mask[:height, :width] = decode_rle(obj["mask"], (height, width))
        objects.append({**obj, "mask": encode_rle(mask)})
    return canvas, {**record, "width": side, "height": side, "objects": objects}


class SceneBatches:
    """Pixels (cached per scene) and dense targets for scene records (`pad`: see pad_scene)."""

    def __init__(self, data: Path, records: list[dict], image_size: int, grid: int, vocabulary: DenseVocabulary,
                 pad: bool = False):
        self.data, self.records, self.grid, self.vocabulary, self.pad = data, records, grid, vocabulary, pad
        self.processor = build_image_processor(image_size)
        self.pixels: dict[int, torch.Tensor] = {}
        self.targets: dict[int, dict] = {}

    def item(self, index: int) -> tuple[torch.Tensor, dict]:
        if index not in self.pixels:
            record = self.records[index]
            image = Image.open(self.data / record["image"]).convert("RGB")
            if self.pad:  # the padded record replaces the original: evaluate() reads it after batch()
                image, record = pad_scene(image, record)
                self.records[index] = record
            # float16 in the cache: a 192 px world's 28,000 training scenes fit in 6.6 GB, not 13
            self.pixels[index] = self.processor(images=image, return_tensors="pt")["pixel_values"][0].half()
            self.targets[index] = scene_patch_targets(record, self.grid, self.vocabulary)
        return self.pixels[index], self.targets[index]

    def batch(self, indices) -> tuple[torch.Tensor, dict]:
        items = [self.item(int(i)) for i in indices]
        pixels = torch.stack([p for p, _ in items]).float()
        targets = {k: torch.stack([t[k] for _, t in items]) for k in items[0][1]}
        return pixels, targets


def object_cells(record: dict, grid: int) -> list[np.ndarray]:
    """Per object: coverage of each cell [grid*grid] (visible mask)."""
    width, height = int(record["width"]), int(record["height"])
    return [patch_coverage(decode_rle(o["mask"], (height, width)), grid).reshape(-1) for o in record["objects"]]


def unsupervised_share(records: list[dict], grid: int, min_cover: float = 0.2) -> float:
    """Share of objects that win no cell at `grid` (the dense loss never sees them)."""
    missed = total = 0
    for record in records:
        vocabulary = DenseVocabulary.synthetic()
        targets = scene_patch_targets(record, grid, vocabulary, min_cover)
        for obj in record["objects"]:
            c, s = vocabulary.colors.index(obj["color"]) + 1, vocabulary.shapes.index(obj["shape"]) + 1
            won = (targets["patch_color"] == c) & (targets["patch_shape"] == s)
            missed += int(not bool(won.any()))
            total += 1
    return missed / max(total, 1)


BOX_CODE_WIDTH = 256  # the embedded LLM's hidden size: four 64-wide coordinate blocks


def number_rows() -> torch.Tensor:
    """[1000, 256]: the smooth code of 0..999 in each coordinate block (init_number_rows' layout)."""
    return smooth_number_code(torch.arange(1000), BOX_CODE_WIDTH // BOX_COORDINATES).repeat(1, BOX_COORDINATES)


def box_code_head(kind: str, width: int) -> torch.nn.Module | None:
    if kind == "none":
        return None
    if kind == "linear":
        return torch.nn.Linear(width, BOX_CODE_WIDTH)
    return torch.nn.Sequential(torch.nn.Linear(width, BOX_CODE_WIDTH), torch.nn.GELU(), torch.nn.Linear(BOX_CODE_WIDTH, BOX_CODE_WIDTH))


def decode_box_code(vectors: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """Coordinates (0-999) of the mean over cells of each block's logits against the rows."""
    return box_code_logits(vectors, rows).mean(0).argmax(-1).float().tolist()


@torch.no_grad()
def evaluate(tower, head, batches: SceneBatches, vocabulary: DenseVocabulary, grid: int, code_head=None) -> dict:
    tower.eval()
    right_color = right_shape = right_both = boxed = coded = total = 0
    rows = number_rows()
    nc = vocabulary.num_colors
    for start in range(0, len(batches.records), 64):
        indices = range(start, min(start + 64, len(batches.records)))
        pixels, _ = batches.batch(indices)
        features = tower(pixels)
        logits = head(features)  # [B, N, 4 + nc + ns]
        codes = code_head(features) if code_head is not None else None
        for row, index in enumerate(indices):
            record = batches.records[index]
            covers = object_cells(record, grid)
            stacked = np.stack(covers)
            owner = stacked.argmax(0)
            for k, obj in enumerate(record["objects"]):
                cells = np.nonzero((owner == k) & (stacked[k] >= 0.2))[0]
                if len(cells) == 0:
                    cells = np.array([int(stacked[k].argmax())])
                mean = logits[row, torch.from_numpy(cells)].mean(0)
                color = int(mean[4:4 + nc][1:].argmax()) + 1
                shape = int(mean[4 + nc:][1:].argmax()) + 1
                ok_c = color == vocabulary.colors.index(obj["color"]) + 1
                ok_s = shape == vocabulary.shapes.index(obj["shape"]) + 1
                right_color += ok_c
                right_shape += ok_s
                right_both += ok_c and ok_s
                box = [pixel_to_grid(v, size) for v, size in zip(obj["box"], (record["width"], record["height"]) * 2)]
                boxed += box_iou(tuple((mean[:4] * 1000).tolist()), tuple(box)) >= 0.5
                if codes is not None:
                    coded += box_iou(tuple(decode_box_code(codes[row, torch.from_numpy(cells)], rows)), tuple(box)) >= 0.5
                total += 1
    tower.train()
    result = {"objects": total, "color": right_color / total, "shape": right_shape / total, "both": right_both / total,
              "box_acc50": boxed / total}
    if codes is not None:
        result["box_code_acc50"] = coded / total
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["data/synth"],
                        help="training world(s); several: their training scenes pooled, as one world")
    parser.add_argument("--image-size", type=int, default=144)
    parser.add_argument("--channels", default="48,96,160")
    parser.add_argument("--strides", default="4,3,1")
    parser.add_argument("--blocks-per-stage", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--max-steps", type=int, default=100000, help="a step budget (then the rate decays as a cosine)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--position-embedding", action="store_true", help="the tower's learned per-cell position code")
    parser.add_argument("--box-code", choices=["none", "linear", "mlp"], default="none",
                        help="also train a box code on a linear / MLP map of the features (see above)")
    parser.add_argument("--init", choices=["torch", "hf"], default="torch",
                        help="hf: conv and linear weights drawn N(0, 0.02), as the full model's post_init draws them")
    parser.add_argument("--out", default=None)
    parser.add_argument("--save", default=None, help="write the trained tower's state dict here")
    parser.add_argument("--val-data", default=None, help="score on this world's val split (default: --data's)")
    parser.add_argument("--pad", action="store_true", help="keep the aspect ratio: pad each image to a square "
                        "(pad_scene) instead of squashing it")
    parser.add_argument("--ood", default=None, help="also score the final tower on this out-of-generator set "
                        "(scenes_ood.json, from ferret.eval.ood_scenes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data[0])
    vocabulary = DenseVocabulary.synthetic()
    config = ConvVisionConfig(image_size=args.image_size, channels=[int(c) for c in args.channels.split(",")],
                              strides=[int(s) for s in args.strides.split(",")], blocks_per_stage=args.blocks_per_stage,
                              position_embedding=args.position_embedding)
    grid = config.grid_size
    tower = ConvVisionTower(config, frozen=False)
    head = torch.nn.Linear(config.hidden_size, 4 + vocabulary.num_colors + vocabulary.num_shapes)
    code_head = box_code_head(args.box_code, config.hidden_size)
    if args.init == "hf":
        for module in [*tower.modules(), head, *(code_head.modules() if code_head else [])]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
    rows = number_rows()
    params = list(tower.parameters()) + list(head.parameters()) + (list(code_head.parameters()) if code_head else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    pooled = [{**r, "image": str(Path(root) / r["image"])} for root in args.data for r in load_records(Path(root), "train")]
    train = SceneBatches(Path("."), pooled, args.image_size, grid, vocabulary, args.pad)
    val_data = Path(args.val_data) if args.val_data else data
    val = SceneBatches(val_data, load_records(val_data, "val")[: args.val_scenes], args.image_size, grid, vocabulary,
                       args.pad)
    info = {"grid": grid, "image_tokens": grid * grid, "params": sum(p.numel() for p in tower.parameters()),
            # counted on the squashed records: with --pad the records are padded only as they load
            "unsupervised_objects_val": None if args.pad else unsupervised_share(val.records, grid), "args": vars(args)}
    print(json.dumps(info), flush=True)
    rng = np.random.default_rng(args.seed)
    nc = vocabulary.num_colors
    curve, start, step = [], time.perf_counter(), 0
    budget = args.minutes * 60
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    while step < args.max_steps and time.perf_counter() - start < budget:
        pixels, targets = train.batch(rng.integers(len(train.records), size=args.batch))
        with autocast:
            features = tower(pixels)
            out = head(features).float()
        loss = F.cross_entropy(out[..., 4:4 + nc].reshape(-1, nc), targets["patch_color"].reshape(-1))
        loss = loss + F.cross_entropy(out[..., 4 + nc:].reshape(-1, vocabulary.num_shapes), targets["patch_shape"].reshape(-1))
        covered = targets["patch_color"] > 0
        loss = loss + F.l1_loss(out[..., :4][covered], targets["patch_box"][covered].float() / 1000.0)
        if code_head is not None:
            loss = loss + box_code_loss(code_head(features.float()), targets["patch_box"], covered, rows, sigma=6.0)
        lr = args.lr * min(1.0, (step + 1) / 50)
        if args.max_steps < 100000:  # a step budget: cosine decay to 0 over it
            lr *= 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            point = {"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": round(loss.item(), 4),
                     **evaluate(tower, head, val, vocabulary, grid, code_head)}
            curve.append(point)
            print(json.dumps(point), flush=True)
    final = {"step": step, "seconds": round(time.perf_counter() - start, 1),
             **evaluate(tower, head, val, vocabulary, grid, code_head)}
    result = {**info, "curve": curve, "final": final}
    if args.ood:
        ood = SceneBatches(Path(args.ood), load_records(Path(args.ood), "ood"), args.image_size, grid, vocabulary,
                           args.pad)
        result["final_ood"] = evaluate(tower, head, ood, vocabulary, grid, code_head)
        print(json.dumps({"ood": result["final_ood"]}), flush=True)
    print(json.dumps(final), flush=True)
    if args.save:
        torch.save({"config": config.to_dict(), "tower": tower.state_dict()}, args.save)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
