"""train.lm_loss_tokens: the answer loss as a token sum over a constant, so a token's weight does
not depend on how many answer tokens share its micro-batch (length-grouped batches)."""

import pytest
import torch
import torch.nn.functional as F

from ferret.constants import IGNORE_INDEX
from ferret.training.answer_loss import answer_loss
from ferret.training.config import TrainConfigError, apply_overrides, config_from_dict


def batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's mean over supervised tokens (position t predicts label t + 1)."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep], targets[keep])


def labelled(lengths: list[int], width: int = 12, vocab: int = 7, seed: int = 0):
    """Logits [B, width, vocab] and labels with `lengths[b]` supervised tokens at the end of row b."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(lengths), width, vocab, generator=g, requires_grad=True)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    for row, n in enumerate(lengths):
        labels[row, width - n:] = torch.randint(vocab, (n,), generator=g)
    return logits, labels


def test_without_the_constant_the_mean_is_unchanged():
    logits, labels = labelled([3, 5])
    mean = batch_loss(logits, labels)
    assert answer_loss(mean, labels, None) is mean


def test_with_the_constant_it_is_the_token_sum_over_it():
    logits, labels = labelled([3, 5, 1])
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(answer_loss(batch_loss(logits, labels), labels, 4.0), total / 4.0)


@pytest.mark.parametrize("constant", [None, 6.0])
def test_a_tokens_weight_does_not_depend_on_its_batch_only_with_the_constant(constant):
    # The same sample (row 0) in a batch of short samples and in a batch of long ones: the gradient
    # on its logits is the same with the constant, and smaller among long samples without it.
    grads = []
    for others in ([1, 1, 1], [9, 9, 9]):
        logits, labels = labelled([4] + others)
        answer_loss(batch_loss(logits, labels), labels, constant).backward()
        grads.append(logits.grad[0])
    same = torch.allclose(grads[0], grads[1])
    assert same == (constant is not None)
    if constant is None:
        assert grads[1].norm() < 0.5 * grads[0].norm()


def test_config_key_reads_a_number_and_rejects_zero():
    minimal = {"model": {"tiny": True}, "data": {"data_path": ["a.json"]}}
    cfg = config_from_dict(minimal)
    assert cfg.train.lm_loss_tokens is None
    assert apply_overrides(cfg, ["train.lm_loss_tokens=640"]).train.lm_loss_tokens == 640
    with pytest.raises(TrainConfigError, match=r"^train.lm_loss_tokens: must be > 0"):
        apply_overrides(cfg, ["train.lm_loss_tokens=0"])
