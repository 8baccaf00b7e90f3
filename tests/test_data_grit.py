"""GRIT-format loading, validation, mixing and rendering (placeholders -> coordinates + masks)."""

import json
import logging
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from ferret.constants import IGNORE_INDEX, REGION_TOKEN
from ferret.conversation import tokenize_conversation
from ferret.data.errors import DataFormatError
from ferret.data.grit import (
    DataSource,
    GritDataConfig,
    extend_by_multiple,
    load_grit_file,
    mix_sources,
    render_sample,
)
from ferret.data.rle import decode_rle, encode_rle
from ferret.data.synthetic import generate

COORDS_RE = re.compile(r"\[(\d+(?:, \d+)*)\]")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("grit_world")
    generate(str(out), n=60, seed=11, workers=1)
    return out


@pytest.fixture(scope="module")
def samples(world):
    return load_grit_file(str(world / "train.json"))


def _first(samples, task, **extra):
    for s in samples:
        if s["task"] == task and all(s.get(k) == v for k, v in extra.items()):
            return s
    raise AssertionError(f"no {task} sample in the test world")


def _grid(v, side):
    return int(v * 1000 / side)


def _force(sample, fmt):
    return dict(sample, region_format=[fmt, None])


def test_box_region_round_trip(samples):
    sample = _force(_first(samples, "refer_object"), "box")
    w, h = sample["image_w"], sample["image_h"]
    x1, y1, x2, y2 = sample["box_x1y1x2y2"][0][0]
    rendered = render_sample(sample, np.random.default_rng(0))
    (role, question), (role2, answer) = rendered.messages
    assert role == "USER" and role2 == "ASSISTANT"
    assert question.startswith("<image>\n")
    assert f"[{_grid(x1, w)}, {_grid(y1, h)}, {_grid(x2, w)}, {_grid(y2, h)}] {REGION_TOKEN}" in question
    assert "bbox_location" not in question
    assert answer == sample["conversations"][1]["value"]
    (mask,) = rendered.region_masks
    assert mask.shape == (w, h) and mask.dtype == torch.bool
    xs, ys = torch.nonzero(mask, as_tuple=True)
    assert xs.min() >= x1 and xs.max() <= x2 and ys.min() >= y1 and ys.max() <= y2
    segment = decode_rle(sample["masks"][0][0], (h, w))
    assert torch.equal(mask, torch.from_numpy(segment.T.copy()))  # box intersected with the object


def test_point_region_round_trip(samples):
    sample = _force(_first(samples, "refer_object"), "point")
    w, h = sample["image_w"], sample["image_h"]
    rendered = render_sample(sample, np.random.default_rng(0))
    question = rendered.messages[0][1]
    (px, py), = [tuple(map(int, m.split(", "))) for m in COORDS_RE.findall(question)]
    (point,) = rendered.regions
    assert (px, py) == (_grid(point.x, w), _grid(point.y, h))
    segment = decode_rle(sample["masks"][0][0], (h, w))
    assert segment[int(point.y), int(point.x)]  # segment_mask|uniform lands on the object
    (mask,) = rendered.region_masks
    xs, ys = torch.nonzero(mask, as_tuple=True)
    assert (xs - point.x).abs().max() <= 5 and (ys - point.y).abs().max() <= 5  # 11x11 window
    assert segment[ys.numpy(), xs.numpy()].all()  # ...intersected with the object


def test_free_form_region_is_the_scribble(samples):
    sample = next(s for s in samples if "scribbles" in s)
    w, h = sample["image_w"], sample["image_h"]
    rendered = render_sample(sample, np.random.default_rng(0))
    scribble = decode_rle(sample["scribbles"][0][0], (h, w))
    (mask,) = rendered.region_masks
    assert torch.equal(mask, torch.from_numpy(scribble.T.copy()))
    ys, xs = np.nonzero(scribble)
    expected = f"[{_grid(xs.min(), w)}, {_grid(ys.min(), h)}, {_grid(xs.max(), w)}, {_grid(ys.max(), h)}]"
    assert expected + f" {REGION_TOKEN}" in rendered.messages[0][1]


def test_assistant_boxes_are_plain_and_make_no_masks(samples):
    sample = _first(samples, "grounded_caption")
    w, h = sample["image_w"], sample["image_h"]
    rendered = render_sample(sample, np.random.default_rng(0))
    answer = rendered.messages[1][1]
    assert REGION_TOKEN not in answer and rendered.region_masks == []
    boxes = [list(map(int, m.split(", "))) for m in COORDS_RE.findall(answer)]
    expected = [[_grid(b[0], w), _grid(b[1], h), _grid(b[2], w), _grid(b[3], h)] for b in sample["box_x1y1x2y2"][1]]
    assert boxes == expected


def test_labels_supervise_only_the_assistant(samples, tiny_tokenizer):
    sample = _force(_first(samples, "refer_object"), "box")
    rendered = render_sample(sample, np.random.default_rng(0))
    ids, labels = tokenize_conversation(rendered.messages, tiny_tokenizer)
    supervised = ids[labels != IGNORE_INDEX]
    text = tiny_tokenizer.decode(supervised.tolist())
    assert text.strip() == sample["conversations"][1]["value"] + tiny_tokenizer.eos_token
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    assert int((ids == region_id).sum()) == len(rendered.region_masks) == 1
    assert (labels[ids == region_id] == IGNORE_INDEX).all()


def _two_mentions_sample():
    """One object mentioned twice in one human turn, then echoed by the assistant."""
    h, w = 40, 50
    seg = np.zeros((h, w), bool)
    seg[10:30, 5:25] = True
    other = np.zeros((h, w), bool)
    other[2:8, 30:45] = True
    box, box2 = [5, 10, 24, 29], [30, 2, 44, 7]
    return {
        "image_w": w, "image_h": h,
        "conversations": [
            {"from": "human", "value": "Is <bbox_location0> near <bbox_location1>, and <bbox_location2>?"},
            {"from": "gpt", "value": "Yes <bbox_location0>."},
        ],
        "box_x1y1x2y2": [[box, box2, box], [box]],
        "masks": [[encode_rle(seg), encode_rle(other), encode_rle(seg)], [encode_rle(seg)]],
    }


def test_same_object_twice_gets_the_same_point_and_assistant_echoes_it():
    sample = dict(_two_mentions_sample(), region_format=["point", None])
    rendered = render_sample(sample, np.random.default_rng(5))
    question, answer = rendered.messages[0][1], rendered.messages[1][1]
    coords = COORDS_RE.findall(question)
    assert len(coords) == 3 and coords[0] == coords[2] != coords[1]
    assert len(coords[0].split(", ")) == 2
    assert COORDS_RE.findall(answer) == [coords[0]]  # released point_box_cache behaviour
    assert len(rendered.region_masks) == 3
    assert torch.equal(rendered.region_masks[0], rendered.region_masks[2])
    # Without refer_previous_point each mention draws its own point.
    config = GritDataConfig(refer_previous_point=False)
    differ = 0
    for seed in range(5):
        coords = COORDS_RE.findall(render_sample(sample, np.random.default_rng(seed), config).messages[0][1])
        differ += coords[0] != coords[2]
    assert differ > 0


def test_masks_follow_text_order_of_placeholders():
    sample = _two_mentions_sample()
    sample["conversations"][0]["value"] = "<bbox_location1> then <bbox_location0> and <bbox_location2>"
    sample["region_format"] = ["box", None]
    rendered = render_sample(sample, np.random.default_rng(0))
    first = rendered.region_masks[0]
    assert first[30:45, 2:8].all() and first.sum() == 15 * 6  # box 1 comes first in the text


def test_no_region_feature_writes_plain_coordinates():
    sample = dict(_two_mentions_sample(), region_format=["box", None])
    rendered = render_sample(sample, np.random.default_rng(0), GritDataConfig(add_region_feature=False))
    assert REGION_TOKEN not in rendered.messages[0][1] and rendered.region_masks == []


def test_random_format_choice_is_seeded_and_uses_both_formats(samples):
    sample = _first(samples, "refer_object", region_format=None)
    texts = [render_sample(sample, np.random.default_rng([0, 0, k])).messages[0][1] for k in range(16)]
    again = [render_sample(sample, np.random.default_rng([0, 0, k])).messages[0][1] for k in range(16)]
    assert texts == again
    arity = Counter(len(COORDS_RE.findall(t)[0].split(", ")) for t in texts)
    assert arity[2] > 0 and arity[4] > 0


@pytest.mark.parametrize("strategy", ["segment_mask|center", "segment_mask|gaussian", "center", "gaussian"])
def test_point_strategies_reach_the_renderer(samples, strategy):
    sample = _force(_first(samples, "refer_object"), "point")
    rendered = render_sample(sample, np.random.default_rng(0), GritDataConfig(point_strategy=strategy))
    (point,) = rendered.regions
    x1, y1, x2, y2 = sample["box_x1y1x2y2"][0][0]
    assert x1 <= point.x <= x2 and y1 <= point.y <= y2
    if strategy == "center":
        assert (point.x, point.y) == ((x1 + x2) / 2, (y1 + y2) / 2)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="point sampling strategy"):
        GritDataConfig(point_strategy="corner")


# ---------------------------------------------------------------- mixing


def test_extend_by_multiple_matches_released_counts():
    items = list(range(50))
    rng = np.random.default_rng(0)
    assert len(extend_by_multiple(items, 0.2, rng)) == 10
    assert extend_by_multiple(items, 3, rng) == items * 3
    mixed = extend_by_multiple(items, 1.5, rng)
    assert mixed[:50] == items and len(mixed) == 75 and set(mixed[50:]) <= set(items)
    assert extend_by_multiple(items, 0, rng) == []
    with pytest.raises(ValueError, match="multiple"):
        extend_by_multiple(items, -1, rng)


def test_mix_sources_applies_multiples_and_is_deterministic(world):
    train, val = str(world / "train.json"), str(world / "val.json")
    n_train, n_val = len(load_grit_file(train)), len(load_grit_file(val))
    sources = [DataSource(train, multiple=0.5), DataSource(val, multiple=3)]
    mixed = mix_sources(sources, seed=1)
    assert len(mixed) == int(np.ceil(n_train * 0.5)) + 3 * n_val
    assert [s["id"] for s in mixed] == [s["id"] for s in mix_sources(sources, seed=1)]
    assert [s["id"] for s in mixed] != [s["id"] for s in mix_sources(sources, seed=2)]
    assert len(mix_sources([DataSource(train), DataSource(val)])) == n_train + n_val


# ---------------------------------------------------------------- bad input


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_bad_samples_are_skipped_and_counted(world, tmp_path, caplog):
    good = json.loads((world / "train.json").read_text())
    base = next(s for s in good if s["task"] == "refer_object")
    base = dict(base, image=str(world / base["image"]))
    w, h = base["image_w"], base["image_h"]

    def variant(**changes):
        return json.loads(json.dumps(dict(base, **changes)))

    bad_rle = variant()
    bad_rle["masks"][0][0] = encode_rle(np.ones((h + 1, w), bool))
    no_box = variant(conversations=[{"from": "human", "value": "<image>\nWhat is <bbox_location0> and "
                                     "<bbox_location1>?"}, base["conversations"][1]])
    no_placeholder = variant(conversations=[{"from": "human", "value": "<image>\nWhat is it?"},
                                            base["conversations"][1]])
    samples = [
        base,
        variant(image=str(world / "images" / "missing.png")),
        variant(box_x1y1x2y2=[[[w + 5, 1, w + 20, 9]], []]),
        bad_rle,
        no_box,
        no_placeholder,
        variant(box_x1y1x2y2=[[[9, 9, 3, 3]], []]),
        variant(conversations=[base["conversations"][1], base["conversations"][0]]),
        {k: v for k, v in base.items() if k != "image"},  # <image> in the text, no image
        variant(conversations=[base["conversations"][0], {"from": "gpt", "value": " "}]),
    ]
    skipped = Counter()
    with caplog.at_level(logging.WARNING, logger="ferret.data.grit"):
        kept = load_grit_file(_write(tmp_path, "bad.json", samples), image_folder="/", skipped=skipped)
    assert len(kept) == 1 and kept[0]["id"] == base["id"]
    assert skipped == Counter({
        "missing_image": 1, "box_outside_image": 1, "mask_size_mismatch": 1, "placeholder_without_box": 1,
        "box_without_placeholder": 1, "bad_box": 1, "bad_structure": 3,
    })
    assert sum("skipping sample" in r.message for r in caplog.records) == 9
    assert any("missing.png" in r.message for r in caplog.records)


def test_box_partly_outside_is_clamped_like_released(samples):
    sample = json.loads(json.dumps(_force(_first(samples, "refer_object"), "box")))
    sample.pop("masks")
    w, h = sample["image_w"], sample["image_h"]
    sample["box_x1y1x2y2"][0][0] = [-10, -4, w + 30, h + 2]
    rendered = render_sample(sample, np.random.default_rng(0))
    assert f"[0, 0, {_grid(w - 1, w)}, {_grid(h - 1, h)}] {REGION_TOKEN}" in rendered.messages[0][1]
    assert rendered.region_masks[0].all()  # no segment: the clamped box covers the image


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"image": "a.png",\n   "conversations": [}\n]')
    with pytest.raises(DataFormatError, match=r"broken\.json at line 3, column 22"):
        load_grit_file(str(path))
    with pytest.raises(DataFormatError, match="expected a json list"):
        load_grit_file(_write(tmp_path, "obj.json", {"a": 1}))
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_grit_file(str(tmp_path / "nowhere.json"))
