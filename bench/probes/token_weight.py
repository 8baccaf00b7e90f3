"""How much of the LM loss's gradient does each task get, with and without length-grouped batches?
(issue 13: Flickr-style phrase grounding fell from ~0.70 to 0.53-0.56 in both grouped runs.)

    python bench/probes/token_weight.py --config train/configs/embedded.yaml --steps 200

The LM loss is the mean over a micro-batch's answer tokens, so one token weighs 1 / (the answer
tokens of its micro-batch). Grouped batches put long samples (many boxes, long captions) together,
so each of their tokens weighs less than in a mixed batch. For the first `--steps` micro-steps of
epoch 0 of every rank (the trainer's own sampler), this encodes each item (real labels), splits
its answer tokens by turn and so by task (`turn_tasks`), and reports per task: its share of the
answer tokens, and its share of the loss's weight (sum over its tokens of 1 / micro-batch tokens,
over the number of micro-batches), random order against grouped, and a micro-batch's mean answer
tokens (the value for train.lm_loss_tokens). Writes JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ferret.eval.common import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # length_grouping.py beside this script
from length_grouping import config_dataset  # noqa: E402


def answer_segments(labels) -> list[int]:
    """Token counts of the runs of supervised labels (one run per answer turn)."""
    runs, current = [], 0
    for value in list(labels) + [-100]:
        if value != -100:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def task_weights(batches: list[list[dict[str, int]]]) -> dict[str, dict[str, float]]:
    """Per task: share of answer tokens and share of the loss weight (token-mean per micro-batch).
    `batches`: per micro-batch, per sample, {task: answer tokens}."""
    tokens, weight = defaultdict(float), defaultdict(float)
    for batch in batches:
        total = sum(n for sample in batch for n in sample.values())
        for sample in batch:
            for task, n in sample.items():
                tokens[task] += n
                weight[task] += n / total
    all_tokens, all_weight = sum(tokens.values()), sum(weight.values())
    return {task: {"token_share": tokens[task] / all_tokens, "loss_weight_share": weight[task] / all_weight}
            for task in sorted(tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from ferret.training.seeding import ResumableDistributedSampler

    cfg, dataset = config_dataset(args.config, args.overrides)
    micro = cfg.train.per_device_batch_size
    cache: dict[int, dict[str, int]] = {}

    def by_task(index: int) -> dict[str, int]:
        if index not in cache:
            runs = answer_segments(dataset.build_item(index)["labels"])
            tasks = dataset.samples[index]["turn_tasks"]
            if len(runs) != len(tasks):
                raise ValueError(f"sample {index}: {len(runs)} answer runs for {len(tasks)} turns")
            counts: dict[str, int] = defaultdict(int)
            for task, n in zip(tasks, runs):
                counts[task] += n
            cache[index] = dict(counts)
        return cache[index]

    def top_level(batch: list[dict[str, int]]) -> list[dict[str, int]]:
        merged = []
        for sample in batch:
            counts: dict[str, int] = defaultdict(int)
            for task, n in sample.items():
                counts[task.split("/")[0]] += n
            merged.append(counts)
        return merged

    report = {"config": args.config, "steps": args.steps, "world": args.world, "micro_batch": micro}
    for name, lengths in (("random", None), ("grouped", dataset.rough_lengths())):
        batches = []
        for rank in range(args.world):
            share = ResumableDistributedSampler(len(dataset), rank, args.world, cfg.train.seed, cfg.train.shuffle,
                                                lengths=lengths, batch_size=micro).indices()[: args.steps * micro]
            batches += [[by_task(i) for i in share[k:k + micro]] for k in range(0, len(share), micro)]
        report[name] = {"tasks": task_weights([top_level(b) for b in batches]), "subtasks": task_weights(batches),
                        # train.lm_loss_tokens for this config: a micro-batch's mean answer tokens
                        "answer_tokens_per_micro_batch": sum(n for b in batches for s in b for n in s.values())
                        / len(batches)}
    for level in ("tasks", "subtasks"):
        random, grouped = report["random"][level], report["grouped"][level]
        report[f"grouped_over_random_loss_weight_{level}"] = {
            task: grouped[task]["loss_weight_share"] / random[task]["loss_weight_share"]
            for task in random if task in grouped}
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
