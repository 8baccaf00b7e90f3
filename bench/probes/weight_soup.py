"""Average the weights of exported models that share an architecture (a "soup" of fine-tunes
from one model, or an interpolation between a model and its fine-tune).

    python bench/probes/weight_soup.py --out /tmp/soup5 checkpoints/ft_small/hf checkpoints/ft_refer/hf ...
    python bench/probes/weight_soup.py --out /tmp/wise50 checkpoints/ft_small/hf:1 checkpoints/full_2x_neg40/hf:1

Each source is an `hf` folder, optionally `:weight` (default 1); weights are normalised. The
output is a copy of the first folder (config, tokenizer, processor) with the averaged
`model.safetensors` (`ferret.training.checkpoint.average_exports`, which a config's soup stage
also uses: train/ferret_train.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ferret.training.checkpoint import TrainingCheckpointError, average_exports


def parse_source(text: str) -> tuple[Path, float]:
    """FOLDER or FOLDER:WEIGHT; average_exports checks the folder and the weight's sign."""
    path, _, weight = text.partition(":")
    try:
        return Path(path), float(weight) if weight else 1.0
    except ValueError:
        raise SystemExit(f"weight_soup: {text!r}: the weight after ':' is not a number") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("sources", nargs="+", help="hf folders, each optionally FOLDER:WEIGHT")
    args = parser.parse_args(argv)
    sources = [parse_source(s) for s in args.sources]
    try:
        average_exports(sources, args.out)
    except TrainingCheckpointError as err:
        raise SystemExit(f"weight_soup: {err}") from None
    print(f"weight_soup: {len(sources)} models -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
