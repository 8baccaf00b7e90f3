"""Measure the GRIT loader: samples per second through a DataLoader (images, masks, tokens).

    python -m ferret.data.throughput --data data/synth --workers 2 --samples 512
"""

from __future__ import annotations

import argparse
import json
import os
import time

from torch.utils.data import DataLoader, Subset

from ferret.data.collate import FerretCollator
from ferret.data.grit import DataSource, GritDataConfig, GritDataset

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tokenizer")


def measure(data_dir: str, workers: int = 2, batch_size: int = 16, samples: int = 512, image_size: int = 112,
            tokenizer_dir: str = DEFAULT_TOKENIZER) -> dict:
    from transformers import AutoTokenizer

    from ferret.processing import build_image_processor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    dataset = GritDataset.from_sources([DataSource(os.path.join(data_dir, "train.json"))], tokenizer,
                                       build_image_processor(image_size), GritDataConfig())
    subset = Subset(dataset, range(min(samples, len(dataset))))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers,
                        collate_fn=FerretCollator(tokenizer.pad_token_id))
    start = time.perf_counter()
    seen = masks = 0
    first_batch = None
    for batch in loader:
        if first_batch is None:
            first_batch = time.perf_counter() - start
        seen += batch["input_ids"].shape[0]
        masks += sum(len(m) for m in batch["region_masks"])
    seconds = time.perf_counter() - start
    return {"samples": seen, "region_masks": masks, "workers": workers, "batch_size": batch_size,
            "image_size": image_size, "seconds": round(seconds, 2), "first_batch_s": round(first_batch or 0, 2),
            "samples_per_s": round(seen / seconds, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure GRIT loader throughput.")
    parser.add_argument("--data", required=True, help="folder with train.json")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.data, args.workers, args.batch_size, args.samples, args.image_size,
                             args.tokenizer), indent=2))


if __name__ == "__main__":
    main()
