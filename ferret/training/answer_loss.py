"""The answer (LM) loss the trainer steps on."""

from __future__ import annotations

import torch

from ferret.constants import IGNORE_INDEX


def answer_loss(mean_loss: torch.Tensor, labels: torch.Tensor, lm_loss_tokens: float | None) -> torch.Tensor:
    """`mean_loss` (the micro-batch's mean over its supervised tokens) as is, or with
    `lm_loss_tokens` (train.lm_loss_tokens) their sum over that constant: every token then weighs
    the same whatever batch it is in, so length-grouped batches of long samples do not weigh their
    tokens less than a shuffled order would (bench/probes/token_weight.py)."""
    if lm_loss_tokens is None:
        return mean_loss
    supervised = (labels[:, 1:] != IGNORE_INDEX).sum()  # position t predicts label t + 1
    return mean_loss * supervised.to(mean_loss.device) / lm_loss_tokens
