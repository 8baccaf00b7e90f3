"""Seeded randomness of a run: which samples each rank sees, and the region sampler's draws.

Both depend only on the config's seed and the run's position (epoch, step, rank), so a resumed
run draws exactly what the interrupted one would have drawn next.
"""

from __future__ import annotations

import math

import torch


def region_seed(seed: int, step: int, rank: int, micro_step: int) -> int:
    """Seed of the region points' generator for one micro-batch."""
    return (((seed * 1_000_003 + step) * 10_007 + rank) * 101 + micro_step) % (2**63 - 1)


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded per-epoch permutation, skipping the first `start` of them.

    The order depends only on (seed, epoch, world size), so a resumed run sees exactly the
    samples the interrupted one would have seen next.

    With `lengths` (one rough length per sample) and `batch_size` (the micro-batch), the
    permutation is cut into windows of GROUP_WINDOW micro-steps; each window is sorted by length
    and its micro-steps (world x batch samples, dealt to the ranks in turn) are put back in a
    seeded random order. A batch then pads to a length near its samples' own, and the ranks of a
    step wait less for each other (the embedded recipe: the slower rank's padded text 0.83x,
    bench/probes/length_grouping.py).
    """

    GROUP_WINDOW = 16  # micro-steps per window: small enough that the order stays well mixed

    def __init__(self, length: int, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 lengths: list[int] | None = None, batch_size: int = 1):
        if lengths is not None and len(lengths) != length:
            raise ValueError(f"lengths: {len(lengths)} values for {length} samples")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.lengths, self.batch_size = lengths, batch_size
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
            if self.lengths is not None:
                order = self._grouped(order, g)
        else:
            order = list(range(self.length))
        order += order[: self.per_rank * self.world_size - self.length]  # pad so ranks get equal shares
        return order[self.rank :: self.world_size]

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        step = self.world_size * self.batch_size
        window = step * self.GROUP_WINDOW
        grouped = []
        for begin in range(0, len(order), window):
            part = sorted(order[begin : begin + window], key=lambda i: -self.lengths[i])
            steps = [part[k : k + step] for k in range(0, len(part), step)]
            full = [s for s in steps if len(s) == step]  # a short last one stays last
            for k in torch.randperm(len(full), generator=g).tolist():
                grouped += full[k]
            grouped += [i for s in steps if len(s) < step for i in s]
        return grouped

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
