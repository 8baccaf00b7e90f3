"""GritDataset items, seeded epochs, run-time skips, collation, DataLoader with workers."""

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN
from ferret.data.collate import FerretCollator
from ferret.data.errors import SampleError
from ferret.data.grit import DataSource, GritDataConfig, GritDataset, load_grit_file
from ferret.data.synthetic import generate
from ferret.processing import build_image_processor

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset_world")
    generate(str(out), n=30, seed=5, workers=1)
    return out


@pytest.fixture(scope="module")
def processor():
    return build_image_processor(IMAGE_SIZE)


def _dataset(world, tokenizer, processor, **config):
    return GritDataset.from_sources([DataSource(str(world / "train.json"))], tokenizer, processor,
                                    GritDataConfig(**config))


def _same(a, b):
    return (torch.equal(a["input_ids"], b["input_ids"]) and len(a["region_masks"]) == len(b["region_masks"])
            and all(torch.equal(x, y) for x, y in zip(a["region_masks"], b["region_masks"])))


def test_item_fields(world, tiny_tokenizer, processor):
    ds = _dataset(world, tiny_tokenizer, processor)
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    for i in range(len(ds)):
        item = ds[i]
        sample = ds.samples[i]
        assert item["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert item["image_size"] == (sample["image_w"], sample["image_h"])
        assert item["input_ids"].shape == item["labels"].shape
        assert int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 1
        assert int((item["input_ids"] == region_id).sum()) == len(item["region_masks"])
        assert len(item["region_masks"]) == len(sample["box_x1y1x2y2"][0])
        for mask in item["region_masks"]:
            assert mask.shape == item["image_size"] and mask.any()
        assert item["task"] == sample["task"]
        assert (item["labels"] != IGNORE_INDEX).any()


def test_same_seed_epoch_index_gives_the_same_item(world, tiny_tokenizer, processor):
    ds = _dataset(world, tiny_tokenizer, processor, seed=4)
    other = _dataset(world, tiny_tokenizer, processor, seed=4)  # a "resumed" run
    assert [s["id"] for s in ds.samples] == [s["id"] for s in other.samples]
    for i in range(0, len(ds), 4):
        assert _same(ds[i], other[i]) and _same(ds[i], ds[i])
    ds.set_epoch(1)
    changed = sum(not _same(ds[i], other[i]) for i in range(0, len(ds), 2))
    assert changed > 0  # a new epoch draws new points / formats
    other.set_epoch(1)
    assert all(_same(ds[i], other[i]) for i in range(0, len(ds), 4))


def test_corrupt_image_and_wrong_size_are_skipped_at_run_time(world, tiny_tokenizer, processor, tmp_path, caplog):
    samples = load_grit_file(str(world / "train.json"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    small = tmp_path / "small.png"
    shutil.copy(samples[2]["image"], small)
    bad = [dict(samples[0], image=str(broken)), dict(samples[1], image_w=samples[1]["image_w"] + 1), samples[2]]
    bad[1]["box_x1y1x2y2"] = samples[1]["box_x1y1x2y2"]
    ds = GritDataset(bad, tiny_tokenizer, processor)
    item = ds[0]  # falls through both bad samples to the good one
    assert item["image_size"] == (samples[2]["image_w"], samples[2]["image_h"])
    assert ds.skipped["bad_image"] == 1 and ds.skipped["image_size_mismatch"] == 1
    assert item["skipped"] == ["bad_image", "image_size_mismatch"]
    assert "skipped 2 samples" in ds.skip_report()
    batch = FerretCollator(tiny_tokenizer.pad_token_id)([item, ds[2]])
    assert batch["skipped"] == {"bad_image": 1, "image_size_mismatch": 1}
    assert any("broken.png" in r.message for r in caplog.records)
    with pytest.raises(SampleError, match="consecutive"):
        GritDataset(bad[:2], tiny_tokenizer, processor, max_fallbacks=2)[0]


def test_truncation_keeps_masks_matching_region_tokens(world, tiny_tokenizer, processor):
    ds = _dataset(world, tiny_tokenizer, processor)
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)

    def region_positions(item):
        return (item["input_ids"] == region_id).nonzero().flatten().tolist()

    # The first sample that refers to at least two regions (which task families do so is the
    # generator's business; this test is about truncation).
    index = next(i for i in range(len(ds)) if len(region_positions(ds[i])) >= 2)
    full = ds[index]
    positions = region_positions(full)
    cut = _dataset(world, tiny_tokenizer, processor, max_length=positions[1])[index]
    assert len(cut["input_ids"]) <= positions[1]
    assert int((cut["input_ids"] == region_id).sum()) == len(cut["region_masks"]) == 1
    assert torch.equal(cut["region_masks"][0], full["region_masks"][0])


def test_collator_pads_right(world, tiny_tokenizer, processor):
    ds = _dataset(world, tiny_tokenizer, processor)
    items = [ds[i] for i in range(4)]
    batch = FerretCollator(pad_token_id=tiny_tokenizer.pad_token_id)(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tiny_tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n and batch["attention_mask"][row, :n].all()
        assert batch["region_masks"][row] is not item["region_masks"]
        assert len(batch["region_masks"][row]) == len(item["region_masks"])
    assert batch["image_sizes"] == [it["image_size"] for it in items]
    assert batch["tasks"] == [it["task"] for it in items]
    with pytest.raises(ValueError, match="empty batch"):
        FerretCollator(pad_token_id=0)([])


def test_dataloader_with_two_workers(world, tiny_tokenizer, processor):
    ds = _dataset(world, tiny_tokenizer, processor)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=FerretCollator(tiny_tokenizer.pad_token_id))
    seen = 0
    for batch in loader:
        seen += batch["input_ids"].shape[0]
        assert len(batch["region_masks"]) == batch["input_ids"].shape[0]
    assert seen == len(ds)
    # Workers see the same seeded samples as the main process.
    first = next(iter(loader))
    assert torch.equal(first["input_ids"][0, : len(ds[0]["input_ids"])], ds[0]["input_ids"])


def test_llava_conversations_load_through_the_same_dataset(world, tiny_tokenizer, processor, tmp_path):
    image = load_grit_file(str(world / "train.json"))[0]["image"]
    llava = [
        {"id": "a", "image": image, "conversations": [
            {"from": "human", "value": "What shapes are there?\n<image>"},
            {"from": "gpt", "value": "Some shapes."},
            {"from": "human", "value": "Any colours?"},
            {"from": "gpt", "value": "Yes."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]},
    ]
    path = tmp_path / "llava_instruct.json"
    path.write_text(json.dumps(llava))
    samples = load_grit_file(str(path), image_folder="/")
    assert len(samples) == 2
    ds = GritDataset(samples, tiny_tokenizer, processor)
    first, text_only = ds[0], ds[1]
    assert int((first["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 1
    at = first["input_ids"].tolist().index(IMAGE_TOKEN_INDEX)
    assert tiny_tokenizer.decode(first["input_ids"][:at].tolist()).endswith("USER: ")  # opens the first turn
    assert tiny_tokenizer.decode(first["input_ids"][at + 1:at + 8].tolist()).startswith("\nWhat shapes")
    supervised = tiny_tokenizer.decode(first["input_ids"][first["labels"] != IGNORE_INDEX].tolist())
    assert "Some shapes." in supervised and "Yes." in supervised and "colours" not in supervised
    assert IMAGE_TOKEN_INDEX not in text_only["input_ids"].tolist()
    assert text_only["image_size"] is None and not text_only["pixel_values"].any()
    batch = FerretCollator(tiny_tokenizer.pad_token_id)([first, text_only])
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_tokenizer_without_region_token_is_rejected(world, processor):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(unk_token="<unk>")), unk_token="<unk>")
    with pytest.raises(ValueError, match="region_fea"):
        GritDataset(load_grit_file(str(world / "train.json")), plain, processor)
    with pytest.raises(ValueError, match="no usable samples"):
        GritDataset([], plain, processor)
