"""Points in the training loop where a caller can run code: tests use them to crash a run hard at
a chosen place and check that `--resume` recovers. Production runs set none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingCallbacks:
    """Each runs on rank 0 only, with the global step just reached."""

    # after the optimizer step (and its checkpoint, when one is due)
    after_step: Callable[[int], None] | None = None
    # while checkpoint `step` is fully staged but not yet published
    checkpoint_staged: Callable[[int], None] | None = None
