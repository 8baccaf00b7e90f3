"""Append a decoder layer to an exported model without changing what it computes (issue 13,
session 37: the shipped model decides an object's shape in one layer, its third, and never corrects
it; does one more layer after it help, trained in stage 2?).

    python bench/probes/grow_decoder.py --src checkpoints/repro_s35/hf --out checkpoints/grow5_base/hf

The new last layer is a copy of the current last one (its attention and MLP read the residual as
that layer learnt to) with its two output projections (attention o_proj, MLP down_proj) zeroed, so
it adds nothing until trained: the grown model's logits equal the source's. It gets its own
layer index (the generation cache keys on it). Validation only: a probe, not the product's builder.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch


def grow(model) -> None:
    """Append the zero-output copy of the last decoder layer to `model` (in place)."""
    layers = model.model.layers
    new = copy.deepcopy(layers[-1])
    new.self_attn.layer_idx = len(layers)
    with torch.no_grad():
        new.self_attn.o_proj.weight.zero_()
        new.mlp.down_proj.weight.zero_()
    layers.append(new)
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types) + [model.config.layer_types[-1]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ferret.model  # noqa: F401  (registers the Ferret classes with the Auto factories)

    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.src)
    ids = tokenizer("A test of the grown model: the blue square", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
        grow(model)
        after = model(input_ids=ids).logits
    if not torch.equal(before, after):
        raise SystemExit(f"grow_decoder: the grown model's logits moved by {(before - after).abs().max():.3g}")
    shutil.copytree(args.src, args.out, dirs_exist_ok=True)
    model.save_pretrained(args.out)
    print(f"grow_decoder: {args.src} -> {args.out}: {model.config.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, logits unchanged")


if __name__ == "__main__":
    main()
