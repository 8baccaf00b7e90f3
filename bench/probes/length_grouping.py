"""How many padded tokens does a training step carry, with and without length-grouped batches?
(issue 13's 60-minute budget: the LLM stage's steps cost in proportion to the padded sequence.)

    python bench/probes/length_grouping.py --config train/configs/embedded.yaml --steps 100

Builds the config's dataset and the trainer's sampler for every rank (world 2 by default), takes
the first `--steps` micro-steps of epoch 0 with `data.group_by_length` off and on, encodes each
item (real token counts) and reports, per variant: the mean text tokens per sample, the mean
padded batch length (to the batch's longest, then to `data.pad_to_multiple_of`), the mean over
steps of the longest rank's padded length (a step waits for its slowest rank), and the rank
correlation of the sampler's rough lengths with the real ones. Writes JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from ferret.eval.common import write_json

REPO = Path(__file__).resolve().parents[2]


def config_dataset(config: str, overrides: list[str]):
    """The training config and the dataset its trainer builds (tokenizer and image processor included)."""
    from ferret.data.grit import DataSource, GritDataConfig, GritDataset
    from ferret.training.config import load_train_config, resolve_path
    from ferret.training.model_setup import build_model

    cfg = load_train_config(config, overrides)
    _, tokenizer, image_processor = build_model(cfg)  # the tiny model is cheap to build
    sources = [DataSource(path=resolve_path(p)) for p in cfg.data.data_path]
    return cfg, GritDataset.from_sources(sources, tokenizer, image_processor, GritDataConfig(
        point_strategy=cfg.data.point_input_sample, max_length=cfg.data.model_max_length, seed=cfg.train.seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from ferret.training.seeding import ResumableDistributedSampler

    cfg, dataset = config_dataset(args.config, args.overrides)
    micro, multiple = cfg.train.per_device_batch_size, max(1, cfg.data.pad_to_multiple_of)
    rough = dataset.rough_lengths()
    real: dict[int, int] = {}

    def length(index: int) -> int:
        if index not in real:
            real[index] = len(dataset.build_item(index)["input_ids"])
        return real[index]

    report = {"config": args.config, "steps": args.steps, "world": args.world, "micro_batch": micro}
    for name, lengths in (("random", None), ("grouped", rough)):
        ranks = [ResumableDistributedSampler(len(dataset), r, args.world, cfg.train.seed, cfg.train.shuffle,
                                             lengths=lengths, batch_size=micro) for r in range(args.world)]
        shares = [s.indices()[: args.steps * micro] for s in ranks]
        padded = [[math.ceil(max(length(i) for i in share[k:k + micro]) / multiple) * multiple
                   for k in range(0, len(share), micro)] for share in shares]
        report[name] = {
            "text_tokens_per_sample": statistics.mean(length(i) for share in shares for i in share),
            "padded_batch_length": statistics.mean(p for rank in padded for p in rank),
            "slowest_rank_padded_length": statistics.mean(max(step) for step in zip(*padded)),
        }
    ranked = sorted(real)
    order = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    report["rough_vs_real_rank_correlation"] = float(np.corrcoef(order([rough[i] for i in ranked]),
                                                                 order([real[i] for i in ranked]))[0, 1])
    r, g = report["random"]["slowest_rank_padded_length"], report["grouped"]["slowest_rank_padded_length"]
    report["grouped_over_random_slowest_rank"] = g / r
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
