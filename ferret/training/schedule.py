"""The learning-rate schedule and the AdamW parameter groups."""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup from 0, then cosine to 0 (HF `get_cosine_schedule_with_warmup`, as released) or constant."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total, kind))


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors), as HF Trainer does."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
