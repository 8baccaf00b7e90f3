"""Masks -> sampled points on CPU without listing every mask pixel: the reference's draws, exactly.

`reference.sample_mask_points` lists a mask's P pixels (nonzero(): 16 bytes each) and draws
randperm(P) (8 bytes each) to keep N of them: about 24 bytes per pixel, 0.6 GB for one full
24 MP mask. Here only per-row pixel counts are kept (8 bytes per mask row) and the N chosen
pixels are found without the permutation or the pixel list:

* torch's CPU randperm (for n < 2**32 / 20) is a forward Fisher-Yates shuffle: step i swaps entry
  i with entry i + (random() % (n - i)), so its first N entries are final after N steps. Those
  steps are replayed with the same generator (`torch.randint(0, n - i)` draws random() % (n - i))
  and the generator is then advanced by the n - 1 - N draws randperm would still have made, so
  what is drawn next (the next mask, the FPS starts) is unchanged too.
* rank r (the r-th pixel in nonzero() order, row-major over (x, y)) lies in the first row whose
  running pixel count exceeds r, at that row's (r - pixels before it)-th set pixel.

Replaying the swaps costs one generator call each, so masks of at most `LISTED_MASK_PIXELS`
pixels (at most 24 MB listed) are sampled as the reference samples them; so are masks outside
the case above (a CUDA generator, n >= 2**32 / 20). `kernels/tests/test_mask_points_cpu.py` checks equality with it, generator state
included.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["sample_mask_points", "mask_average_pool", "pixels_at_ranks", "randperm_prefix"]

# torch's CPU randperm shuffles n < this with random() % (n - i); above it, another algorithm.
RANDPERM_FISHER_YATES_LIMIT = (2**32 - 1) // 20
# Masks up to this size are listed like the reference lists them (cheaper; at most 24 MB).
LISTED_MASK_PIXELS = 1 << 20
# Pixels per chunk of the row counts and row scans: bounds their int64/int32 scratch (2 MB).
_CHUNK_PIXELS = 1 << 18


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Set pixels per row of a (W, H) bool mask -> long [W], in chunks of rows (a plain
    `mask.sum(1)` would first copy the whole mask to int64)."""
    counts = torch.empty(mask.shape[0], dtype=torch.long)
    step = max(1, _CHUNK_PIXELS // max(1, mask.shape[1]))
    for start in range(0, mask.shape[0], step):
        torch.sum(mask[start : start + step], dim=1, out=counts[start : start + step])
    return counts


def randperm_prefix(n: int, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """`torch.randperm(n, generator=generator)[:length]` on CPU, and the same generator state
    afterwards, without the n-entry permutation (n < RANDPERM_FISHER_YATES_LIMIT)."""
    if not 1 <= length <= n < RANDPERM_FISHER_YATES_LIMIT:
        raise ValueError(f"need 1 <= length <= n < {RANDPERM_FISHER_YATES_LIMIT}, got length {length}, n {n}")
    moved: dict[int, int] = {}  # the permutation's entries that differ from the identity
    prefix = []
    steps = min(length, n - 1)  # randperm makes n - 1 swaps; the last entry is then fixed
    for i in range(steps):
        j = i + int(torch.randint(0, n - i, (1,), generator=generator))
        prefix.append(moved.get(j, j))
        moved[j] = moved.get(i, i)
    if length > steps:
        prefix.append(moved.get(n - 1, n - 1))
    remaining = n - 1 - steps
    while remaining > 0:  # one random() per uint8 draw: the swaps randperm would still make
        take = min(remaining, _CHUNK_PIXELS)
        torch.randint(0, 2, (take,), generator=generator, dtype=torch.uint8)
        remaining -= take
    return torch.tensor(prefix, dtype=torch.long)


def pixels_at_ranks(mask: torch.Tensor, counts: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Pixels [len(ranks), 2] = (x, y) of the given ranks in the mask's nonzero() order, from
    its row counts; equal to `mask.nonzero()[ranks]`."""
    ends = counts.cumsum(0)
    rows = torch.searchsorted(ends, ranks, right=True)
    within = ranks - (ends[rows] - counts[rows])  # index among the set pixels of its row
    cols = torch.empty_like(ranks)
    step = max(1, _CHUNK_PIXELS // max(1, mask.shape[1]))
    for start in range(0, len(ranks), step):
        stop = start + step
        running = mask[rows[start:stop]].cumsum(dim=1, dtype=torch.int32)
        target = (within[start:stop] + 1).to(torch.int32).unsqueeze(1)
        cols[start:stop] = torch.searchsorted(running, target).squeeze(1)
    return torch.stack([rows, cols], dim=1)


def _drawn_on_cpu(mask: torch.Tensor, generator: torch.Generator | None) -> bool:
    return mask.device.type == "cpu" and (generator is None or generator.device.type == "cpu")


def _pixel_count(mask: torch.Tensor, region: int) -> tuple[torch.Tensor, int]:
    counts = row_counts(mask)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"region {region}: mask of shape {tuple(mask.shape)} is empty (no pixel set)")
    return counts, total


def _unlisted_count(mask: torch.Tensor, region: int) -> tuple[torch.Tensor, int] | None:
    """(row counts, pixel count) of a mask to sample without listing it; None for one the
    reference's way suits (small, or beyond randperm's Fisher-Yates range)."""
    if mask.numel() <= LISTED_MASK_PIXELS:
        return None
    counts, total = _pixel_count(mask, region)
    return (counts, total) if total < RANDPERM_FISHER_YATES_LIMIT else None


def sample_mask_points(
    masks: reference.MaskInput, num_points: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`reference.sample_mask_points`, the same points and generator state, in memory
    proportional to the mask rows instead of the mask pixels."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    mask_list = reference._as_mask_list(masks)
    if not mask_list:
        raise ValueError("no masks given")
    if not all(_drawn_on_cpu(mask, generator) for mask in mask_list):
        return reference.sample_mask_points(mask_list, num_points, generator)
    sampled = []
    for region, mask in enumerate(mask_list):
        counted = _unlisted_count(mask, region)
        if counted is None:
            sampled.append(reference._sample_one_mask(mask, region, num_points, generator))
            continue
        counts, total = counted
        if total >= num_points:
            ranks = randperm_prefix(total, num_points, generator)
        else:  # every pixel once, then draws with replacement (as the reference)
            extra = torch.randint(0, total, (num_points - total,), generator=generator)
            ranks = torch.cat([torch.arange(total), extra])
        sampled.append(reference._normalise(pixels_at_ranks(mask, counts, ranks), mask))
    return torch.stack(sampled)


def mask_average_pool(
    feature_maps: torch.Tensor,
    masks: reference.MaskInput,
    image_index: torch.Tensor,
    num_points: int | None = 512,
    layout: str = "official",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`reference.mask_average_pool` with the pixel choice made as in `sample_mask_points`:
    a mask with more than `num_points` pixels is never listed whole."""
    mask_list = reference._as_mask_list(masks)
    if not mask_list:
        raise ValueError("no masks given")
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be >= 1 or None, got {num_points}")
    if num_points is None or not all(_drawn_on_cpu(mask, generator) for mask in mask_list):
        return reference.mask_average_pool(feature_maps, mask_list, image_index, num_points, layout, generator)
    chosen = []
    for region, mask in enumerate(mask_list):
        counted = _unlisted_count(mask, region)
        if counted is not None and counted[1] > num_points:
            pixels = pixels_at_ranks(mask, counted[0], randperm_prefix(counted[1], num_points, generator))
        else:
            pixels = reference._mask_pool_pixels(mask, region, num_points, generator)
        chosen.append(reference._normalise(pixels, mask))
    return reference._average_at_points(feature_maps, chosen, image_index, layout)
