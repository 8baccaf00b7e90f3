"""The synthetic world's targets attached to the generic dataset's items (ferret.training.scene_targets)."""

import pytest
import torch

from ferret.data.collate import FerretCollator
from ferret.data.grit import DataSource, GritDataset, load_grit_file
from ferret.data.synthetic import generate
from ferret.processing import build_image_processor
from ferret.training.dense_supervision import ScenePatchTargets
from ferret.training.scene_targets import STACKED_KEYS, PER_ITEM_KEYS, SceneTargetCollator, SceneTargetDataset

GRID = 4
TARGET_KEYS = STACKED_KEYS + PER_ITEM_KEYS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("scene_world")
    generate(str(out), n=6, seed=11, workers=1)
    return out


def two_scenes(world) -> list[dict]:
    """Two samples of different scenes."""
    samples = load_grit_file(str(world / "train.json"))
    other = next(s for s in samples if s["scene_id"] != samples[0]["scene_id"])
    return [samples[0], other]


@pytest.fixture(scope="module")
def targets(world):
    return ScenePatchTargets.from_file(str(world / "scenes_train.json"), grid=GRID)


def test_items_carry_their_scene_targets_and_the_plain_dataset_none(world, targets, tiny_tokenizer):
    plain = GritDataset.from_sources([DataSource(str(world / "train.json"))], tiny_tokenizer, build_image_processor(32))
    wrapped = SceneTargetDataset(plain, targets)
    assert len(wrapped) == len(plain)
    for index in range(len(wrapped)):
        item, bare = wrapped[index], plain[index]
        assert not set(TARGET_KEYS) & set(bare)
        sample = plain.samples[index]
        torch.testing.assert_close(item["patch_color"], targets[sample["scene_id"]]["patch_color"])
        assert item["patch_box"].shape == (GRID * GRID, 4)
        assert len(item["region_color"]) == len(item["region_masks"])
        assert item["answer_cells"].shape[1] == GRID * GRID
        assert torch.equal(item["input_ids"], bare["input_ids"])  # the generic part is untouched
    batch = SceneTargetCollator(FerretCollator(tiny_tokenizer.pad_token_id))([wrapped[0], wrapped[1]])
    assert batch["patch_color"].shape == (2, GRID * GRID) and len(batch["answer_cells"]) == 2


def test_targets_follow_the_sample_actually_used_when_a_bad_one_is_skipped(world, targets, tiny_tokenizer, tmp_path):
    samples = two_scenes(world)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    dataset = GritDataset([dict(samples[0], image=str(broken)), samples[1]], tiny_tokenizer, build_image_processor(32))
    item = SceneTargetDataset(dataset, targets)[0]  # sample 0 is skipped: sample 1's targets
    assert item["skipped"] == ["bad_image"] and item["sample_index"] == 1
    torch.testing.assert_close(item["patch_color"], targets[samples[1]["scene_id"]]["patch_color"])


def test_samples_outside_the_records_get_no_targets(world, tiny_tokenizer):
    samples = two_scenes(world)
    records = ScenePatchTargets.from_file(str(world / "scenes_train.json"), grid=GRID).records
    only_first = ScenePatchTargets([records[int(samples[0]["scene_id"])]], grid=GRID)
    dataset = SceneTargetDataset(GritDataset(samples, tiny_tokenizer, build_image_processor(32)), only_first)
    assert "patch_color" in dataset[0] and not set(TARGET_KEYS) & set(dataset[1])
    batch = SceneTargetCollator(FerretCollator(tiny_tokenizer.pad_token_id))([dataset[0], dataset[1]])
    assert not set(TARGET_KEYS) & set(batch)  # a mixed batch trains the auxiliary losses on none
