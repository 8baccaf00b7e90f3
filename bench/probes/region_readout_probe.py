"""How much of a region's shape can a region sampler read from a trained tower's maps? (issue 13:
naming misses by shape, and the region embeddings tell 0.94 of the shapes, the naming's ceiling.)

    python bench/probes/region_readout_probe.py --model-path ferret/assets/model --maps coarse fine both \
        --steps 600 --out bench/probes/results/region_readout/shipped.json

The model's tower is frozen. For each `--maps` arm a fresh region sampler (the model's geometry)
and a linear colour / shape classifier are trained on one referred object per training scene (its
visible mask or, half the time, its box, as the warm-up refers), then scored on every object of
the first `--val-scenes` val scenes and of the out-of-generator set, as a box and as a point (a
disk of radius 3 px around one pixel of the object, smaller than the 11x11 window that
`ferret.regions.region_mask` makes of a point, so the point numbers are a lower bound), split by
the object's radius in the tower's input:

* `coarse`: the tower's 12x12 grid (what the shipped region sampler reads);
* `fine`: the first stage's map (36x36 for the embedded tower);
* `both`: one sampler on each, embeddings summed (the fine region path of session 21's ft_fine,
  whose code is in commit 4ce20ac).

The arms share the seed, the scenes and the regions, so they differ only in the maps they read.
Validation and the out-of-generator set only, never test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferret.eval.common import write_json
from ferret.training.dense_supervision import DenseVocabulary, region_object_targets
from ferret.training.synthetic_world import warm_up_region_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))  # naming_errors.py beside this script
from naming_errors import input_radius_bin  # noqa: E402


class RegionClassifier(nn.Module):
    """Region sampler(s) on the chosen maps, then colour and shape logits."""

    def __init__(self, model, maps: str, vocabulary: DenseVocabulary, seed: int):
        super().__init__()
        from ferret.model.sampler import GeoRegionSampler

        torch.manual_seed(seed)
        base = model.model.region_geo_sampler
        tower = model.get_vision_tower().config
        geometry = dict(num_init_point=base.num_init_point, num_sub_point=base.num_sub_point,
                        num_neighbor=base.num_neighbor, pooler_mode=base.pooler_mode, feature_layout=base.feature_layout)
        width = model.config.hidden_size
        self.coarse = GeoRegionSampler(tower.hidden_size, width, **geometry) if maps in ("coarse", "both") else None
        self.fine = GeoRegionSampler(tower.channels[0], width, **geometry) if maps in ("fine", "both") else None
        self.head = nn.Linear(width, vocabulary.num_colors + vocabulary.num_shapes + 2)
        self.num_colors = vocabulary.num_colors + 1

    def forward(self, grid: torch.Tensor, fine: torch.Tensor, masks: list[list[torch.Tensor]], seed: int):
        out = None
        if self.coarse is not None:
            out = torch.cat(self.coarse(grid, masks, generator=torch.Generator().manual_seed(seed)))
        if self.fine is not None:
            detail = torch.cat(self.fine(fine, masks, generator=torch.Generator().manual_seed(seed + 1)))
            out = detail if out is None else out + detail
        logits = self.head(out)
        return logits[:, : self.num_colors], logits[:, self.num_colors:]


class FeatureCache:
    """Per scene: the tower's grid [S*S, hidden] and its first stage's map [(S*b)^2, channels[0]],
    both row-major, kept in fp16 (the arms share the cache: ~0.17 MB a scene)."""

    def __init__(self, model, data: Path, records: list[dict], processor):
        self.model, self.data, self.records, self.processor, self.cache = model, data, records, processor, {}

    @torch.no_grad()
    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from ferret.processing import preprocess_images

        todo = [i for i in indices if i not in self.cache]
        if todo:
            pixels = preprocess_images([str(self.data / self.records[i]["image"]) for i in todo], self.processor)
            tower = self.model.get_vision_tower()
            grid, first = tower(pixels), tower.stages[0](pixels).flatten(2).transpose(1, 2)
            for i, g, f in zip(todo, grid, first):
                self.cache[i] = (g.half(), f.half())
        return tuple(torch.stack([self.cache[i][part] for i in indices]).float() for part in (0, 1))


def object_regions(record: dict) -> list[tuple[str, int, torch.Tensor]]:
    """(kind, object index, (W, H) mask) for every object: its box, and a 3-px disk at a pixel of it."""
    from ferret.data.rle import decode_rle

    width, height = int(record["width"]), int(record["height"])
    out = []
    for k, obj in enumerate(record["objects"]):
        box = torch.zeros(width, height, dtype=torch.bool)
        x1, y1, x2, y2 = (int(v) for v in obj["box"])
        box[x1 : x2 + 1, y1 : y2 + 1] = True
        out.append(("box", k, box))
        visible = decode_rle(obj["mask"], (height, width)).T
        xs, ys = np.nonzero(visible)
        if len(xs):
            i = len(xs) // 2  # a fixed pixel of the object
            gx, gy = np.mgrid[:width, :height]
            out.append(("point", k, torch.from_numpy((gx - xs[i]) ** 2 + (gy - ys[i]) ** 2 <= 9)))
    return out


@torch.no_grad()
def score(classifier: RegionClassifier, cache: FeatureCache, records: list[dict], vocabulary, image_size: int) -> dict:
    right: dict[str, list[int]] = {}

    def add(key, ok):
        right.setdefault(key, [0, 0])
        right[key][0] += int(ok)
        right[key][1] += 1

    for i, record in enumerate(records):
        regions = object_regions(record)
        features = cache([i])
        colour, shape = classifier(*features, [[m for _, _, m in regions]], seed=i)
        for (kind, k, _), c, s in zip(regions, colour.argmax(-1), shape.argmax(-1)):
            obj = record["objects"][k]
            ok_shape = int(s) == vocabulary.shapes.index(obj["shape"]) + 1
            ok_both = ok_shape and int(c) == vocabulary.colors.index(obj["color"]) + 1
            size = input_radius_bin(obj["box"], record["width"], record["height"], image_size)
            for key in (f"{kind}/shape", f"{kind}/both", f"{kind}/shape radius {size}"):
                add(key, ok_shape if "shape" in key else ok_both)
    return {k: round(v[0] / v[1], 4) for k, v in sorted(right.items())} | {
        "counts": {k: v[1] for k, v in sorted(right.items()) if "radius" in k}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", default="data/synth", type=Path, help="training scenes (train split) and val")
    parser.add_argument("--ood", default="data/ood", type=Path)
    parser.add_argument("--maps", nargs="+", default=["coarse", "fine", "both"], choices=["coarse", "fine", "both"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    import ferret.model  # noqa: F401  (registers the Ferret classes with the Auto factories)
    from ferret.processing import build_image_processor

    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    tower = model.get_vision_tower().config
    if getattr(tower, "model_type", None) != "ferret_conv_vision":
        raise SystemExit(f"{args.model_path}: the probe reads a conv tower's stages")
    vocabulary = DenseVocabulary.synthetic()
    processor = build_image_processor(tower.image_size)
    train = json.loads((args.data / "scenes_train.json").read_text())
    val = json.loads((args.data / "scenes_val.json").read_text())[: args.val_scenes]
    ood = json.loads((args.ood / "scenes_ood.json").read_text())
    caches = {"train": FeatureCache(model, args.data, train, processor), "val": FeatureCache(model, args.data, val, processor),
              "ood": FeatureCache(model, args.ood, ood, processor)}
    result = {"model": args.model_path, "steps": args.steps, "batch": args.batch, "lr": args.lr, "arms": {}}
    for maps in args.maps:
        start = time.time()
        classifier = RegionClassifier(model, maps, vocabulary, args.seed)
        optimiser = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
        draw = np.random.default_rng(args.seed)
        for step in range(args.steps):
            picks = draw.integers(len(train), size=args.batch).tolist()
            records = [train[i] for i in picks]
            masks = warm_up_region_masks(records, draw)
            targets = [region_object_targets(r, [m], vocabulary) for r, m in zip(records, masks)]
            colour, shape = classifier(*caches["train"](picks), [[m] for m in masks], seed=step)
            loss = (nn.functional.cross_entropy(colour, torch.cat([t["region_color"] for t in targets]))
                    + nn.functional.cross_entropy(shape, torch.cat([t["region_shape"] for t in targets])))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"[{maps}] step {step} loss {loss.item():.3f}", flush=True)
        arm = {"seconds": round(time.time() - start, 1), "last_loss": round(loss.item(), 4),
               "val": score(classifier, caches["val"], val, vocabulary, tower.image_size),
               "ood": score(classifier, caches["ood"], ood, vocabulary, tower.image_size)}
        result["arms"][maps] = arm
        print(maps, json.dumps({k: {m: v for m, v in arm[k].items() if "radius" not in m and m != "counts"} for k in ("val", "ood")}), flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
