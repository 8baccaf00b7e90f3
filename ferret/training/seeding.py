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
    """

    def __init__(self, length: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        order += order[: self.per_rank * self.world_size - self.length]  # pad so ranks get equal shares
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
