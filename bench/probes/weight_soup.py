"""Average the weights of exported models that share an architecture (a "soup" of fine-tunes
from one model, or an interpolation between a model and its fine-tune).

    python bench/probes/weight_soup.py --out /tmp/soup5 checkpoints/ft_small/hf checkpoints/ft_refer/hf ...
    python bench/probes/weight_soup.py --out /tmp/wise50 checkpoints/ft_small/hf:1 checkpoints/full_2x_neg40/hf:1

Each source is an `hf` folder, optionally `:weight` (default 1); weights are normalised. The
output is a copy of the first folder (config, tokenizer, processor) with the averaged
`model.safetensors`. Averaging is done in float64 and stored in each tensor's own dtype;
integer tensors (none in Ferret today) must agree across sources.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def parse_source(text: str) -> tuple[Path, float]:
    path, _, weight = text.partition(":")
    folder = Path(path)
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"weight_soup: {folder / 'model.safetensors'} does not exist")
    try:
        value = float(weight) if weight else 1.0
    except ValueError:
        raise SystemExit(f"weight_soup: {text!r}: the weight after ':' is not a number") from None
    if value <= 0:
        raise SystemExit(f"weight_soup: {text!r}: weights must be > 0")
    return folder, value


def average(sources: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    total = sum(w for _, w in sources)
    first = load_file(str(sources[0][0] / "model.safetensors"))
    sums = {k: v.double() * sources[0][1] if v.is_floating_point() else v for k, v in first.items()}
    for folder, weight in sources[1:]:
        state = load_file(str(folder / "model.safetensors"))
        if state.keys() != first.keys():
            raise SystemExit(f"weight_soup: {folder} holds other tensors than {sources[0][0]}")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise SystemExit(f"weight_soup: {key}: shape {tuple(value.shape)} in {folder}, "
                                 f"{tuple(first[key].shape)} in {sources[0][0]}")
            if value.is_floating_point():
                sums[key] += value.double() * weight
            elif not torch.equal(value, first[key]):
                raise SystemExit(f"weight_soup: {key}: integer tensor differs in {folder}")
    return {k: (v / total).to(first[k].dtype) if v.is_floating_point() else v for k, v in sums.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("sources", nargs="+", help="hf folders, each optionally FOLDER:WEIGHT")
    args = parser.parse_args(argv)
    sources = [parse_source(s) for s in args.sources]
    state = average(sources)
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(sources[0][0], args.out)
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"weight_soup: {len(sources)} models -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
