"""Where a point prompt lands on an object (released `point_input_sample` strategies).

All functions work in raw-image pixel coordinates and take a numpy Generator, so a seeded
generator reproduces the same points.

    segment_mask|uniform   a uniformly random pixel of the object's segment mask
    segment_mask|center    the mask pixel nearest the box centre (among <= 1000 random ones)
    segment_mask|gaussian  the mask pixel nearest a Gaussian draw around the box centre
    center                 the box centre
    gaussian               a Gaussian draw around the box centre, kept inside the box

The segment_mask strategies fall back to `gaussian` for objects without a mask, as the
released loader does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

POINT_STRATEGIES = (
    "segment_mask|uniform",
    "segment_mask|center",
    "segment_mask|gaussian",
    "center",
    "gaussian",
)
# Standard deviation of the Gaussian draw, as a fraction of the box side (released value).
GAUSSIAN_STD_FRACTION = 0.15
# Nearest-pixel searches look at this many random mask pixels (released value).
NEAREST_CANDIDATES = 1000


def check_strategy(strategy: str) -> str:
    if strategy not in POINT_STRATEGIES:
        raise ValueError(f"unknown point sampling strategy {strategy!r}; choose one of {POINT_STRATEGIES}")
    return strategy


def box_center(box: Sequence[float]) -> tuple[float, float]:
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2.0, (y1 + y2) / 2.0


def gaussian_in_box(box: Sequence[float], rng: np.random.Generator,
                    std_fraction: float = GAUSSIAN_STD_FRACTION, max_tries: int = 1000) -> tuple[float, float]:
    """A Gaussian draw around the box centre, redrawn until it falls inside the box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = box_center(box)
    std = np.array([(x2 - x1) * std_fraction, (y2 - y1) * std_fraction])
    for _ in range(max_tries):
        x, y = rng.normal((cx, cy), std)
        if x1 <= x <= x2 and y1 <= y <= y2:
            return float(x), float(y)
    return cx, cy  # unreachable in practice (each try lands inside with p > 0.99)


def uniform_in_mask(mask_hw: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(mask_hw)
    if len(xs) == 0:
        raise ValueError("cannot sample a point in an empty segment mask")
    k = int(rng.integers(len(xs)))
    return float(xs[k]), float(ys[k])


def nearest_in_mask(mask_hw: np.ndarray, anchor: tuple[float, float], rng: np.random.Generator,
                    candidates: int = NEAREST_CANDIDATES) -> tuple[float, float]:
    """The mask pixel nearest `anchor` among up to `candidates` random mask pixels."""
    ys, xs = np.nonzero(mask_hw)
    if len(xs) == 0:
        raise ValueError("cannot sample a point in an empty segment mask")
    if len(xs) > candidates:
        pick = rng.choice(len(xs), size=candidates, replace=False)
        xs, ys = xs[pick], ys[pick]
    dist = (xs - anchor[0]) ** 2 + (ys - anchor[1]) ** 2
    k = int(np.argmin(dist))
    return float(xs[k]), float(ys[k])


def sample_point(strategy: str, box: Sequence[float], segment_hw: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[float, float]:
    """A point (x, y) in pixels for an object with pixel box `box` and optional (H, W) mask."""
    check_strategy(strategy)
    if strategy == "center":
        return box_center(box)
    if strategy == "gaussian" or segment_hw is None:
        return gaussian_in_box(box, rng)
    mode = strategy.split("|", 1)[1]
    if mode == "uniform":
        return uniform_in_mask(segment_hw, rng)
    if mode == "center":
        cx, cy = box_center(box)
        return nearest_in_mask(segment_hw, (float(int(cx)), float(int(cy))), rng)
    return nearest_in_mask(segment_hw, gaussian_in_box(box, rng), rng)
