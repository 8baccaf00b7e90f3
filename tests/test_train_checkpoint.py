"""Checkpoint helpers: atomic publish, `latest` pointer, pruning, RNG state, LoRA merge; schedule and sampler."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ferret.training.checkpoint import (
    TrainingCheckpointError,
    TrainerState,
    atomic_write_text,
    checkpoint_tag,
    list_checkpoints,
    load_rng_state,
    merge_lora_state_dict,
    prune_checkpoints,
    publish_checkpoint,
    read_latest,
    save_rng_state,
    staging_root,
)

REPO = Path(__file__).resolve().parents[1]


def stage(root: Path, step: int, payload: str = "weights") -> str:
    tag = checkpoint_tag(step)
    folder = staging_root(root) / tag
    folder.mkdir(parents=True)
    (folder / "model.bin").write_text(payload)
    (folder / "trainer_state.json").write_text(TrainerState(global_step=step).to_json())
    return tag


def test_publish_moves_then_points_latest(tmp_path):
    assert read_latest(tmp_path) is None
    publish_checkpoint(tmp_path, stage(tmp_path, 10))
    assert read_latest(tmp_path) == tmp_path / "step-00000010"
    assert (tmp_path / "latest").read_text().strip() == "step-00000010"
    assert not (staging_root(tmp_path) / "step-00000010").exists()
    publish_checkpoint(tmp_path, stage(tmp_path, 20))
    assert read_latest(tmp_path).name == "step-00000020"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]


def test_crash_while_staging_keeps_previous_latest(tmp_path):
    publish_checkpoint(tmp_path, stage(tmp_path, 10))
    stage(tmp_path, 20, payload="half-written")  # the process died before publish_checkpoint
    latest = read_latest(tmp_path)
    assert latest.name == "step-00000010"
    assert TrainerState.from_json((latest / "trainer_state.json").read_text()).global_step == 10
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010"]


def test_republishing_a_step_replaces_it(tmp_path):
    publish_checkpoint(tmp_path, stage(tmp_path, 10, payload="old"))
    publish_checkpoint(tmp_path, stage(tmp_path, 10, payload="new"))
    assert (read_latest(tmp_path) / "model.bin").read_text() == "new"


def test_latest_pointing_at_nothing_is_an_error(tmp_path):
    atomic_write_text(tmp_path / "latest", "step-00000042\n")
    with pytest.raises(TrainingCheckpointError, match="step-00000042"):
        read_latest(tmp_path)
    atomic_write_text(tmp_path / "latest", "garbage")
    with pytest.raises(TrainingCheckpointError, match="not a checkpoint tag"):
        read_latest(tmp_path)
    with pytest.raises(TrainingCheckpointError, match="no staged checkpoint"):
        publish_checkpoint(tmp_path, "step-00000001")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "latest", "a")
    atomic_write_text(tmp_path / "latest", "b")
    assert (tmp_path / "latest").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_prune_keeps_newest_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        publish_checkpoint(tmp_path, stage(tmp_path, step))
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-00000001", "step-00000002"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert prune_checkpoints(tmp_path, keep=0) == []


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_rng_state(tmp_path, rank=3)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load_rng_state(tmp_path, rank=3)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    with pytest.raises(TrainingCheckpointError, match="rng_state_rank4"):
        load_rng_state(tmp_path, rank=4)


def test_trainer_state_json_round_trip():
    state = TrainerState(global_step=7, epoch=1, step_in_epoch=2, samples_seen=56, world_size=2)
    assert TrainerState.from_json(state.to_json()) == state


def test_merge_lora_matches_peft_merge_and_unload():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(6, 5))
    base.add_module("head", torch.nn.Linear(5, 3))
    plain_names = set(base.state_dict())
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["proj"]))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    merged = merge_lora_state_dict(model.state_dict(), scaling=6 / 2)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == plain_names == set(reference)
    for name in merged:
        torch.testing.assert_close(merged[name], reference[name])


# --------------------------------------------------------------------------- pieces of the training script


def test_cosine_schedule_with_warmup_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    from ferret.training.schedule import lr_multiplier

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=20)
    for step in range(20):
        assert lr_multiplier(step, 3, 20, "cosine") == pytest.approx(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert lr_multiplier(5, 0, 20, "constant") == 1.0


def test_sampler_partitions_epoch_and_resumes_mid_epoch():
    from ferret.training.seeding import ResumableDistributedSampler

    ranks = [ResumableDistributedSampler(11, r, 2, seed=5) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 6
    assert set(shares[0]) | set(shares[1]) == set(range(11))  # padded by repeating, nothing lost
    ranks[0].set_epoch(3, start=4)
    assert list(ranks[0]) == shares[0][4:] and len(ranks[0]) == 2
    ranks[0].set_epoch(4)
    assert list(ranks[0]) != shares[0]  # a new permutation each epoch


def test_length_grouped_sampler_keeps_the_epoch_and_batches_similar_lengths():
    from ferret.training.seeding import ResumableDistributedSampler

    lengths = [(i * 37) % 101 for i in range(203)]  # 203: a short last window and a padded rank share
    plain = [ResumableDistributedSampler(203, r, 2, seed=5) for r in range(2)]
    grouped = [ResumableDistributedSampler(203, r, 2, seed=5, lengths=lengths, batch_size=4) for r in range(2)]
    for s in plain + grouped:
        s.set_epoch(1)
    shares = [list(s) for s in grouped]
    assert len(shares[0]) == len(shares[1]) == len(plain[0]) == 102
    assert set(shares[0]) | set(shares[1]) == set(range(203))  # every sample once (plus the padding repeat)

    def spread(share):  # mean (longest - shortest) within a micro-batch of 4
        batches = [share[k:k + 4] for k in range(0, 100, 4)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(shares[0]) < 0.3 * spread(list(plain[0]))
    # the two ranks of a step get neighbours in length order
    steps = [(shares[0][k:k + 4], shares[1][k:k + 4]) for k in range(0, 100, 4)]
    assert all(abs(max(lengths[i] for i in a) - max(lengths[i] for i in b)) <= 10 for a, b in steps)
    # windows are not visited longest-first: the step order is shuffled within a window
    first = [max(lengths[i] for i in shares[0][k:k + 4]) for k in range(0, 64, 4)]
    assert first != sorted(first, reverse=True)
    # resumable: a later start is the same order's tail; another epoch is another order
    grouped[0].set_epoch(1, start=8)
    assert list(grouped[0]) == shares[0][8:]
    grouped[0].set_epoch(2)
    assert list(grouped[0]) != shares[0]
    with pytest.raises(ValueError, match="lengths"):
        ResumableDistributedSampler(10, 0, 2, seed=5, lengths=[1, 2, 3], batch_size=2)
