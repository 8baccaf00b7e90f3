"""One input pipeline: chat and training encode through FerretProcessor, pad through FerretCollator,
and AutoProcessor loads the processor from a model folder."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferret.chat import FerretChat
from ferret.constants import IGNORE_INDEX, REGION_TOKEN
from ferret.data.collate import FerretCollator
from ferret.data.grit import GritDataset
from ferret.data.rle import encode_rle
from ferret.model.tiny import build_tiny_model
from ferret.processing import (
    PROCESSOR_CONFIG,
    FerretProcessor,
    build_image_processor,
    open_first_turn_with_image,
    post_process_generation,
)
from ferret.regions import Box, FreeForm, Point, RegionError

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "ferret" / "assets" / "examples" / "shapes.png"  # 400 x 300
SHIPPED_MODEL = ROOT / "ferret" / "assets" / "model"


@pytest.fixture(scope="module")
def chat(tiny_tokenizer):
    model, tokenizer = build_tiny_model(tiny_tokenizer, seed=4)
    return FerretChat(tokenizer, model, build_image_processor(112), context_len=512)


@pytest.fixture
def processor(tiny_tokenizer):
    return FerretProcessor(tiny_tokenizer, build_image_processor(28))


def _grit_sample(question: str, answer: str, box: list, region_format: str, scribble=None) -> dict:
    sample = {
        "image": str(SHAPES), "image_w": 400, "image_h": 300,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "box_x1y1x2y2": [[box], []],
        "region_format": [region_format, None],
    }
    if scribble is not None:
        sample["scribbles"] = [[encode_rle(scribble)], []]
    return sample


@pytest.mark.parametrize("kind", ["box", "free_form"])
def test_chat_and_training_encode_the_same_sample_identically(chat, kind):
    """The chat prompt is the training sample up to its reply: same ids, same region masks, same
    image tensor; what the training sample adds is exactly the supervised reply."""
    box = [50, 60, 150, 160]
    scribble = np.zeros((300, 400), dtype=bool)
    scribble[80:140, 60:130] = True
    region = Box(*box) if kind == "box" else FreeForm(scribble)
    answer = "A red circle [125, 200, 375, 533]."
    sample = _grit_sample("What is <bbox_location0>?", answer, box, kind, scribble if kind == "free_form" else None)
    item = GritDataset([sample], chat.tokenizer, chat.image_processor)[0]
    asked = chat._prepare(str(SHAPES), "What is <region>?", [region]).sample

    prompt = len(asked["input_ids"])
    assert torch.equal(item["input_ids"][:prompt], asked["input_ids"])
    assert (item["labels"][:prompt] == IGNORE_INDEX).all()
    reply = item["input_ids"][prompt:]
    assert torch.equal(item["labels"][prompt:], reply)
    assert chat.tokenizer.decode(reply) == f" {answer}</s>"
    assert torch.equal(item["pixel_values"], asked["pixel_values"])
    assert item["image_size"] == asked["image_size"] == (400, 300)
    assert len(item["region_masks"]) == len(asked["region_masks"]) == 1
    assert torch.equal(item["region_masks"][0], asked["region_masks"][0])
    assert int(item["region_masks"][0].sum()) > 0

    # Batched, both go through the one collator: the chat batch is the training batch's prompt.
    trained = FerretCollator(chat.tokenizer.pad_token_id)([item])
    generated = chat._batch_inputs([chat._prepare(str(SHAPES), "What is <region>?", [region])])
    assert torch.equal(trained["input_ids"][:, :prompt], generated["input_ids"])
    assert torch.equal(trained["pixel_values"], generated["images"])
    assert torch.equal(trained["region_masks"][0][0], generated["region_masks"][0][0])


def test_training_skips_a_sample_whose_text_holds_a_region_token_without_a_region(tiny_tokenizer):
    bad = _grit_sample(f"What is <bbox_location0> and [1, 2] {REGION_TOKEN}?", "A circle.", [50, 60, 150, 160], "box")
    good = _grit_sample("What is <bbox_location0>?", "A circle.", [50, 60, 150, 160], "box")
    dataset = GritDataset([bad, good], tiny_tokenizer, build_image_processor(28))
    item = dataset[0]
    assert item["skipped"] == ["unencodable"] and len(item["region_masks"]) == 1


def test_encode_is_unpadded_and_checks_length_before_building_masks(processor, tiny_tokenizer):
    image = Image.new("RGB", (32, 24))
    conv = [("USER", f"What is [1, 2] {REGION_TOKEN}?"), ("ASSISTANT", None)]
    sample = processor.encode(image, conv, [Point(3, 3)], return_labels=False)
    assert sample["input_ids"].dim() == 1 and "labels" not in sample
    assert sample["pixel_values"].shape == (3, 28, 28) and sample["image_size"] == (32, 24)
    seen = []

    class TooLong(Exception):
        pass

    def refuse(n_tokens):
        seen.append(n_tokens)
        raise TooLong

    # The region lies outside the image: building its mask would raise RegionError, so TooLong
    # proves the length check ran first.
    with pytest.raises(TooLong):
        processor.encode(image, conv, [Point(99, 1)], check_length=refuse)
    assert seen == [len(sample["input_ids"])]
    with pytest.raises(RegionError):
        processor.encode(image, conv, [Point(99, 1)])


def test_image_placeholder_opens_the_first_user_turn(processor):
    image = Image.new("RGB", (32, 24))
    moved = processor.encode(image, [("USER", " What is it? <image>"), ("ASSISTANT", "A square.")])
    opened = processor.encode(image, [("USER", "<image>\nWhat is it?"), ("ASSISTANT", "A square.")])
    added = processor.encode(image, [("USER", "What is it?"), ("ASSISTANT", "A square.")])
    assert torch.equal(moved["input_ids"], opened["input_ids"]) and torch.equal(added["input_ids"], opened["input_ids"])
    # Already opened: kept as written (no whitespace stripping a second time).
    assert open_first_turn_with_image([("USER", "<image>\nHi "), ("ASSISTANT", "x")]) == [
        ("USER", "<image>\nHi "), ("ASSISTANT", "x")]
    with pytest.raises(ValueError, match="no image"):
        processor.encode(None, [("USER", "<image>\nHi"), ("ASSISTANT", None)])
    with pytest.raises(ValueError, match="regions need an image"):
        processor.encode(None, [("USER", f"[1, 2] {REGION_TOKEN}"), ("ASSISTANT", None)], [Point(1, 1)])
    text_only = processor.encode(None, [("USER", "Hi"), ("ASSISTANT", None)])
    assert text_only["pixel_values"] is None and text_only["image_size"] is None


def test_collator_pads_text_only_and_unlabelled_samples(processor, tiny_tokenizer):
    image = Image.new("RGB", (32, 24))
    with_image = processor.encode(image, [("USER", "Describe it in detail please."), ("ASSISTANT", None)],
                                  return_labels=False)
    text_only = processor.encode(None, [("USER", "Hi"), ("ASSISTANT", None)], return_labels=False)
    batch = FerretCollator(tiny_tokenizer.pad_token_id)([text_only, with_image])
    assert "labels" not in batch
    assert batch["pixel_values"].shape == (1, 3, 28, 28)  # only the sample that has an image
    assert torch.equal(batch["pixel_values"][0], with_image["pixel_values"])
    n = len(text_only["input_ids"])
    assert batch["attention_mask"][0].sum() == n and (batch["input_ids"][0, n:] == tiny_tokenizer.pad_token_id).all()


def test_a_tokenizer_without_pad_token_is_refused_when_padding(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    processor = FerretProcessor(tokenizer, build_image_processor(28))
    image = Image.new("RGB", (32, 24))
    assert processor.encode(image, [("USER", "Hi"), ("ASSISTANT", None)])["input_ids"].numel() > 0
    with pytest.raises(ValueError, match="pad"):
        processor([image], [[("USER", "Hi"), ("ASSISTANT", None)]])


def test_post_process_generation_gives_phrases_with_pixel_boxes():
    text = "A dog [100, 200, 500, 600] and two cats [0, 0, 1000, 999], [600, 700, 200, 100] near [500, 500]."
    found = post_process_generation(text, (640, 480))
    assert [g.phrase for g in found] == ["A dog", "two cats", "two cats", "near"]
    assert found[0].box == pytest.approx((64.0, 96.0, 320.0, 288.0))
    assert found[1].grid == (0, 0, 999, 999)  # clamped to the 0-999 grid
    assert found[2].grid == (200, 100, 600, 700)  # swapped corners reordered
    assert found[3].box is None and found[3].point == pytest.approx((320.0, 240.0))
    assert text[slice(*found[0].span)] == "[100, 200, 500, 600]"
    assert post_process_generation("no boxes here", (640, 480)) == []
    with pytest.raises(RegionError):
        post_process_generation("A dog [1, 2, 3, 4]", (0, 480))


def test_auto_processor_loads_ferret_processor(tiny_tokenizer, tmp_path):
    """AutoProcessor on the shipped model folder and on a folder FerretProcessor.save_pretrained
    wrote (what the trainer's export writes) returns a FerretProcessor, in a fresh interpreter that
    imports only ferret and transformers."""
    saved = tmp_path / "saved"
    FerretProcessor(tiny_tokenizer, build_image_processor(56), max_length=300).save_pretrained(saved)
    assert json.loads((saved / PROCESSOR_CONFIG).read_text())["processor_class"] == "FerretProcessor"
    script = (
        "import json, sys\n"
        "import ferret\n"
        "import ferret.model.configuration_ferret  # registers the Auto classes (import ferret will)\n"
        "from transformers import AutoProcessor\n"
        "out = {}\n"
        "for folder in sys.argv[1:]:\n"
        "    p = AutoProcessor.from_pretrained(folder)\n"
        "    out[folder] = [type(p).__module__ + '.' + type(p).__name__, p.image_processor.size['height'],\n"
        "                   p.max_length, p.region_token_id]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script, str(SHIPPED_MODEL), str(saved)],
                         capture_output=True, text=True, env=env, timeout=900)  # shared CI machines are slow
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert loaded[str(SHIPPED_MODEL)] == ["ferret.processing.FerretProcessor", config["vision_config"]["image_size"],
                                          None, config["im_region_fea_token"]]
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    assert loaded[str(saved)] == ["ferret.processing.FerretProcessor", 56, 300, region_id]
