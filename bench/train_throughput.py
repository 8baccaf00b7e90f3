"""Training-step throughput with the fast region sampler vs the reference one, in one run.

    python bench/train_throughput.py                # CPU, tiny Ferret, synthetic GRIT batches
    python bench/train_throughput.py --steps 8 --batch 4 --geometry released
    python bench/train_throughput.py --model embedded --batch 8   # the shipped default model's
        architecture (train/configs/embedded.yaml: its conv tower, LLaMA 256x4, released sampler
        geometry), its tokenizer, tower trainable as in its training run
    python bench/train_throughput.py --model embedded --batch 8 --backends fast,fast+labels --turns 5
        # the LM head at every position (as transformers does) vs only where a label follows
        # (`logits_at_labels`, what train/ferret_train.py asks for), on 5-turn samples as in training

A training step is what train/ferret_train.py does per micro-batch without DeepSpeed:
forward (vision tower, projector, region sampler, LLaMA), backward, AdamW step, zero_grad.
The sampler backend is switched with FERRET_SAMPLER_BACKEND between interleaved rounds
(reference, fast, reference, fast, ...), so both see the same machine load; a backend named
`NAME+labels` is sampler NAME with the forward's `logits_at_labels=True`; every backend
trains its own copy of the same initial weights on the same batches with the same seeds.
Prints a table and writes JSON to bench/results/train_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Region-sampler geometry: the tiny test model's, or the released one (512 points, 128/32, k=24).
GEOMETRIES = {
    "tiny": {},
    "released": {"sampler_num_init_point": 512, "sampler_num_sub_point": [128, 32], "sampler_num_neighbor": [24, 24]},
}


def make_batches(batch: int, count: int, seed: int, tokenizer, image_processor, turns: int = 1) -> list[dict]:
    from ferret.data.collate import FerretCollator
    from ferret.data.grit import DataSource, GritDataConfig, GritDataset
    from ferret.data.synthetic import SyntheticConfig, generate

    folder = Path(tempfile.mkdtemp(prefix="ferret-bench-"))
    generate(str(folder), n=max(8, batch * count * 2), seed=seed, workers=1,
             config=SyntheticConfig(turns_per_sample=turns))
    dataset = GritDataset.from_sources([DataSource(str(folder / "train.json"))], tokenizer, image_processor,
                                       GritDataConfig(point_strategy="segment_mask|center", seed=seed))
    collate = FerretCollator(tokenizer.pad_token_id)
    items = [dataset[i % len(dataset)] for i in range(batch * count)]
    return [collate(items[i * batch:(i + 1) * batch]) for i in range(count)]


def build_embedded_architecture(seed: int):
    """(model, tokenizer, description): randomly initialised, shaped as the embedded model."""
    from transformers import AutoTokenizer

    from ferret.model.tiny import build_tiny_model
    from ferret.training.config import load_train_config

    cfg = load_train_config(str(REPO / "train" / "configs" / "embedded.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(str(REPO / cfg.model.tokenizer))
    model, tokenizer = build_tiny_model(tokenizer, seed=seed, **cfg.model.tiny_overrides)
    model.get_vision_tower().requires_grad_(not cfg.model.freeze_vision_tower)
    params = sum(p.numel() for p in model.parameters())
    c, v = model.config, model.config.vision_tower_config()
    tower = model.get_vision_tower()
    description = (f"embedded ({params:,} params: LLaMA {c.hidden_size}x{c.num_hidden_layers}, {type(tower).__name__} "
                   f"{v.image_size} px trainable, {tower.num_patches} image tokens, sampler {c.sampler_num_init_point}/"
                   f"{c.sampler_num_sub_point}/k{c.sampler_num_neighbor})")
    return model, tokenizer, description


def train_step(model, optimizer, batch: dict, seed: int, logits_at_labels: bool = False) -> float:
    generator = torch.Generator().manual_seed(seed)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), labels=batch["labels"],
                images=batch["pixel_values"], region_masks=batch["region_masks"], region_generator=generator,
                logits_at_labels=logits_at_labels)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per backend")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="released")
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny",
                        help="tiny: ferret.model.tiny with --geometry; embedded: the architecture of "
                             "train/configs/embedded.yaml (its own sampler geometry; --geometry is ignored)")
    parser.add_argument("--backends", default="reference,fast")
    parser.add_argument("--turns", type=int, default=1, help="question/answer turns per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)

    from ferret.model.tiny import build_tiny_model
    from ferret.processing import build_image_processor

    torch.manual_seed(args.seed)
    if args.model == "embedded":
        model, tokenizer, description = build_embedded_architecture(args.seed)
        args.geometry = "embedded"
    else:
        model, tokenizer = build_tiny_model(seed=args.seed, **GEOMETRIES[args.geometry])
        model.get_vision_tower().requires_grad_(False)
        description = "ferret.model.tiny (2-layer LLaMA 64, 2-layer CLIP 32, 112 px)"
    model.train()
    image_processor = build_image_processor(model.config.vision_tower_config().image_size)
    batches = make_batches(args.batch, args.steps + 1, args.seed, tokenizer, image_processor, args.turns)
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
    positions = sum(int(b["attention_mask"].sum()) + b["input_ids"].shape[0] * (model.get_vision_tower().num_patches - 1)
                    for b in batches)
    regions = sum(len(m) for b in batches for m in b["region_masks"])

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    models = {b: copy.deepcopy(model) for b in backends}
    optimizers = {b: torch.optim.AdamW([p for p in models[b].parameters() if p.requires_grad], lr=1e-4) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    losses: dict[str, list[float]] = {b: [] for b in backends}
    previous = os.environ.get("FERRET_SAMPLER_BACKEND")
    try:
        for step, batch in enumerate(batches):  # step 0 is warm-up, untimed
            for backend in backends:
                sampler, _, mode = backend.partition("+")
                os.environ["FERRET_SAMPLER_BACKEND"] = sampler
                start = time.perf_counter()
                loss = train_step(models[backend], optimizers[backend], batch, args.seed + step, mode == "labels")
                elapsed = time.perf_counter() - start
                if step:
                    times[backend].append(elapsed)
                    losses[backend].append(loss)
    finally:
        if previous is None:
            os.environ.pop("FERRET_SAMPLER_BACKEND", None)
        else:
            os.environ["FERRET_SAMPLER_BACKEND"] = previous

    reference = backends[0]
    rows = []
    for backend in backends:
        median = statistics.median(times[backend])
        rows.append({
            "backend": backend,
            "median_step_ms": round(median * 1e3, 2),
            "samples_per_s": round(args.batch / median, 3),
            "speedup_vs_" + reference: round(statistics.median(times[reference]) / median, 3),
            "losses": [round(x, 5) for x in losses[backend]],
        })
    result = {
        "benchmark": "train_step_throughput",
        "device": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "model": description,
        "sampler_geometry": args.geometry,
        "shapes": {"batch": args.batch, "turns_per_sample": args.turns, "timed_steps": args.steps, "regions_in_run": regions,
                   "labelled_share_of_positions": round(labelled / positions, 3),
                   "max_tokens": max(int(b["input_ids"].shape[1]) for b in batches)},
        "results": rows,
    }
    print(f"{'backend':<10} {'median step ms':>15} {'samples/s':>10} {'speedup':>8}")
    for row in rows:
        print(f"{row['backend']:<10} {row['median_step_ms']:>15.1f} {row['samples_per_s']:>10.2f} "
              f"{row['speedup_vs_' + reference]:>8.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.backends == "reference,fast" else "_" + args.backends.replace(",", "_").replace("+", "-")
    path = out / (f"train_throughput{suffix}_cpu.json" if args.model == "tiny" else f"train_throughput_{args.model}{suffix}_cpu.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
