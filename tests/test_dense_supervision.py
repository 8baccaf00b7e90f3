"""Dense readout targets and loss (ferret.training.dense_supervision) and their plumbing into data and config."""

import numpy as np
import pytest
import torch

from ferret.data.collate import FerretCollator
from ferret.data.rle import encode_rle
from ferret.training.dense_supervision import (
    DenseVocabulary,
    NameDirections,
    class_readout_loss,
    ScenePatchTargets,
    dense_readout_loss,
    patch_coverage,
    scene_patch_targets,
)

VOCAB = DenseVocabulary(colors=("red", "blue"), shapes=("circle", "square"))
HIDDEN = 88
# Name directions on channels past the readout's own (unit basis vectors), so a hand-built
# "perfect" vector can hold both exactly.
DIRECTIONS = NameDirections(color=torch.eye(HIDDEN)[80:82], shape=torch.eye(HIDDEN)[82:84])


def test_patch_coverage_by_hand():
    mask = np.zeros((4, 6), dtype=bool)
    mask[0:2, 0:3] = True  # exactly the top-left patch of a 2x2 grid
    mask[2, 3] = True  # one pixel of the bottom-right patch (2 x 3 = 6 pixels)
    cover = patch_coverage(mask, 2)
    np.testing.assert_allclose(cover, [[1.0, 0.0], [0.0, 1 / 6]])


def test_patch_coverage_uneven_cells_sum_to_area():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.3
    cover = patch_coverage(mask, 8)
    ys = np.rint(np.linspace(0, 37, 9)).astype(int)
    xs = np.rint(np.linspace(0, 53, 9)).astype(int)
    cells = np.outer(np.diff(ys), np.diff(xs))
    assert (cover * cells).sum() == pytest.approx(mask.sum())
    assert cover[0, 0] == pytest.approx(mask[: ys[1], : xs[1]].mean())


@pytest.mark.parametrize("shape, grid", [((37, 53), 8), ((5, 3), 8), ((12, 1), 12), ((160, 320), 12)])
def test_patch_coverage_matches_cell_by_cell_count(shape, grid):
    # Masks smaller than the grid have empty cells (coverage 0), the others exact pixel counts.
    rng = np.random.default_rng(1)
    mask = rng.random(shape) < 0.4
    ys = np.rint(np.linspace(0, shape[0], grid + 1)).astype(int)
    xs = np.rint(np.linspace(0, shape[1], grid + 1)).astype(int)
    expected = np.array([[mask[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() if ys[i + 1] > ys[i] and xs[j + 1] > xs[j] else 0.0
                          for j in range(grid)] for i in range(grid)])
    np.testing.assert_array_equal(patch_coverage(mask, grid), expected)


def test_patch_coverage_rejects_bad_mask():
    with pytest.raises(ValueError, match="2-D mask"):
        patch_coverage(np.zeros((3,), dtype=bool), 2)


def _record(objects):
    return {"scene_id": 7, "width": 8, "height": 8, "objects": objects}


def _object(color, shape, y0, y1, x0, x1):
    mask = np.zeros((8, 8), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return {"name": f"{color} {shape}", "color": color, "shape": shape, "box": [x0, y0, x1 - 1, y1 - 1],
            "mask": encode_rle(mask)}


def test_scene_patch_targets_assigns_the_most_covering_object():
    record = _record([
        _object("red", "circle", 0, 4, 0, 4),  # top-left patch, fully
        _object("blue", "square", 0, 4, 3, 8),  # top-right patch fully, 1/4 of top-left
    ])
    targets = scene_patch_targets(record, 2, VOCAB, min_cover=0.2)
    assert targets["patch_color"].tolist() == [1, 2, 0, 0]
    assert targets["patch_shape"].tolist() == [1, 2, 0, 0]
    # the box on Ferret's 0-999 grid, int(v * 1000 / side): x 3..7, y 0..3 of 8 pixels
    assert targets["patch_box"][1].tolist() == [375, 0, 875, 375]
    assert targets["patch_box"][2:].abs().sum() == 0


def test_scene_patch_targets_threshold_and_vocabulary_errors():
    small = _record([_object("red", "circle", 0, 1, 0, 1)])  # 1 of 16 pixels of its patch
    assert scene_patch_targets(small, 2, VOCAB, min_cover=0.2)["patch_color"].sum() == 0
    assert scene_patch_targets(small, 2, VOCAB, min_cover=0.05)["patch_color"].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="outside the dense vocabulary"):
        scene_patch_targets(_record([_object("green", "circle", 0, 4, 0, 4)]), 2, VOCAB)


def test_scene_patch_targets_cache_and_file_errors(tmp_path):
    targets = ScenePatchTargets([_record([_object("red", "circle", 0, 4, 0, 4)])], grid=2, vocabulary=VOCAB)
    assert 7 in targets and 8 not in targets and None not in targets
    assert targets[7] is targets["7"]
    bad = tmp_path / "scenes.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="scenes_<split>.json"):
        ScenePatchTargets.from_file(str(bad), grid=2)


def _perfect_tokens(color, shape, box):
    cells = color.shape[-1]
    tokens = torch.zeros(1, cells, HIDDEN)
    tokens[0, :, :4] = box[0].float() / 1000
    # the class channels after the box: colour logits (3), shape logits (3)
    tokens[0, torch.arange(cells), 4 + color[0]] = 20.0
    tokens[0, torch.arange(cells), 4 + VOCAB.num_colors + shape[0]] = 20.0
    return tokens


def test_readout_loss_is_low_for_a_perfect_readout_and_trains():
    color = torch.tensor([[1, 2, 0, 0]])
    shape = torch.tensor([[1, 2, 0, 0]])
    box = torch.tensor([[[0, 0, 500, 500], [400, 0, 900, 510], [0, 0, 0, 0], [0, 0, 0, 0]]])
    perfect = _perfect_tokens(color, shape, box)
    assert dense_readout_loss(perfect, color, shape, box, VOCAB).item() < 1e-6
    wrong_box = box.clone()
    wrong_box[0, 1, 0] = 100  # x1 of a covered patch 300 grid units off: L1 0.3 over its 8 values
    assert dense_readout_loss(perfect, color, shape, wrong_box, VOCAB).item() == pytest.approx(0.3 / 8, abs=1e-5)
    wrong_box = box.clone()
    wrong_box[0, 2, 0] = 100  # background patches have no box target
    assert dense_readout_loss(perfect, color, shape, wrong_box, VOCAB).item() < 1e-6
    swapped = perfect[:, [1, 0, 2, 3]]  # red circle and blue square swapped: the names are wrong
    assert dense_readout_loss(swapped, color, shape, box, VOCAB).item() > 1.0

    # A leading CLS token is dropped; the loss trains the channels it reads.
    tokens = torch.zeros(1, 5, HIDDEN, requires_grad=True)
    start = dense_readout_loss(tokens, color, shape, box, VOCAB).item()
    optimizer = torch.optim.Adam([tokens], lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        dense_readout_loss(tokens, color, shape, box, VOCAB).backward()
        optimizer.step()
    assert dense_readout_loss(tokens, color, shape, box, VOCAB).item() < 0.2 * start
    assert tokens.grad[0, 0].abs().sum() == 0  # the CLS position is not read
    assert tokens.grad[0, 1:, :10].abs().sum() > 0
    assert tokens.grad[0, 1:, 10:].abs().sum() == 0  # nor the channels past the readout


def test_region_readout_also_reads_the_name_directions():
    color, shape = torch.tensor([1, 2]), torch.tensor([2, 0])
    vectors = torch.zeros(2, HIDDEN)
    vectors[torch.arange(2), 4 + color] = 20.0
    vectors[torch.arange(2), 4 + VOCAB.num_colors + shape] = 20.0
    channels_only = class_readout_loss(vectors, color, shape, VOCAB)
    assert channels_only.item() < 1e-6
    # the same vectors say nothing along the name directions: that readout is at chance
    both = class_readout_loss(vectors, color, shape, VOCAB, DIRECTIONS)
    assert both.item() == pytest.approx(2 * np.log(3), abs=1e-4)
    vectors[0] += 20.0 * DIRECTIONS.color[0] + 20.0 * DIRECTIONS.shape[1]
    vectors[1] += 20.0 * DIRECTIONS.color[1] - 20.0 * DIRECTIONS.shape.sum(0)
    assert class_readout_loss(vectors, color, shape, VOCAB, DIRECTIONS).item() < 1e-6


def test_readout_loss_needs_enough_channels():
    with pytest.raises(ValueError, match="readout needs 10"):
        dense_readout_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.long),
                           torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), VOCAB)


def test_name_directions_come_from_single_token_word_embeddings():
    from ferret.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    weight = torch.randn(len(tokenizer), 32)
    vocab = DenseVocabulary(colors=("red",), shapes=("circle",))
    try:
        directions = NameDirections.from_embeddings(weight, NameDirections.token_ids(tokenizer, vocab))
    except ValueError as err:  # the tiny tokenizer may split a name: then the error names it
        assert "one token" in str(err)
    else:
        (rid,) = [i for i in tokenizer.encode(" red", add_special_tokens=False)
                  if tokenizer.convert_ids_to_tokens(i) not in ("▁", " ")]
        torch.testing.assert_close(directions.color[0], torch.nn.functional.normalize(weight[rid], dim=0))
        assert directions.color.norm(dim=-1).tolist() == pytest.approx([1.0])
    with pytest.raises(ValueError, match="one token"):
        NameDirections.token_ids(tokenizer, DenseVocabulary(colors=("xq zzv",), shapes=("circle",)))


def test_collator_stacks_targets_only_when_every_item_has_them():
    def item(with_targets):
        out = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]),
               "pixel_values": torch.zeros(3, 4, 4), "region_masks": []}
        if with_targets:
            out.update(patch_color=torch.tensor([1, 0]), patch_shape=torch.tensor([2, 0]),
                       patch_box=torch.zeros(2, 4, dtype=torch.long))
        return out

    from ferret.training.scene_targets import SceneTargetCollator

    collate = SceneTargetCollator(FerretCollator(pad_token_id=0))
    batch = collate([item(True), item(True)])
    assert batch["patch_color"].shape == (2, 2) and batch["patch_box"].shape == (2, 2, 4)
    assert "patch_color" not in collate([item(True), item(False)])
    # the generic collator knows nothing of the synthetic world's targets
    assert "patch_color" not in FerretCollator(pad_token_id=0)([item(True), item(True)])


def test_config_needs_scene_records_for_the_dense_loss():
    from ferret.training.config import TrainConfigError, config_from_dict

    base = {"model": {"tiny": True}, "data": {"data_path": ["x.json"]}}
    with pytest.raises(TrainConfigError, match="data.scene_records"):
        config_from_dict({**base, "train": {"dense_loss_weight": 1.0}})
    with pytest.raises(TrainConfigError, match="train.dense_loss_weight"):
        config_from_dict({**base, "train": {"dense_loss_weight": -1.0}})
    ok = config_from_dict({**base, "data": {"data_path": ["x.json"], "scene_records": "s.json"},
                           "train": {"dense_loss_weight": 0.5}})
    assert ok.train.dense_loss_weight == 0.5
    with pytest.raises(TrainConfigError, match="train.vision_warmup_steps: the warm-up trains on the dense readout"):
        config_from_dict({**base, "train": {"vision_warmup_steps": 10}})
    with pytest.raises(TrainConfigError, match="train.vision_warmup_batch_multiple"):
        config_from_dict({**base, "train": {"vision_warmup_batch_multiple": 0}})


def test_collator_pads_to_a_multiple_within_max_length():
    def item(n):
        return {"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1)}

    assert FerretCollator(0, pad_to_multiple_of=8)([item(3), item(9)])["input_ids"].shape == (2, 16)
    batch = FerretCollator(0, max_length=12, pad_to_multiple_of=8)([item(3), item(9)])
    assert batch["input_ids"].shape == (2, 12)  # rounding stops at max_length
    assert batch["attention_mask"].sum(1).tolist() == [3, 9] and (batch["labels"][:, 9:] == -100).all()


def test_region_object_targets_pick_the_most_overlapped_object():
    from ferret.training.dense_supervision import region_object_targets

    record = _record([_object("red", "circle", 0, 4, 0, 4), _object("blue", "square", 4, 8, 4, 8)])
    box = torch.zeros(8, 8, dtype=torch.bool)  # (W, H): x 2..6, y 3..7 -> 1 red pixel row... mostly blue
    box[2:7, 3:8] = True
    background = torch.zeros(8, 8, dtype=torch.bool)
    background[0, 7] = True  # x 0, y 7: no object
    point_on_red = torch.zeros(8, 8, dtype=torch.bool)
    point_on_red[1, 2] = True
    out = region_object_targets(record, [box, background, point_on_red], VOCAB)
    assert out["region_color"].tolist() == [2, 0, 1]
    assert out["region_shape"].tolist() == [2, 0, 1]
    # the blue square's box x 4..7, y 4..7 of an 8 x 8 image on the 0-999 grid; none for the background
    from ferret.regions import pixel_to_grid
    blue = [pixel_to_grid(4, 8), pixel_to_grid(4, 8), pixel_to_grid(7, 8), pixel_to_grid(7, 8)]
    assert out["region_box"].tolist() == [blue, [0, 0, 0, 0], [pixel_to_grid(0, 8), 0, pixel_to_grid(3, 8), pixel_to_grid(3, 8)]]
    assert region_object_targets(record, [], VOCAB)["region_box"].shape == (0, 4)
    assert region_object_targets(record, [], VOCAB)["region_color"].shape == (0,)
    with pytest.raises(ValueError, match="not the image's"):
        region_object_targets(record, [torch.zeros(4, 8, dtype=torch.bool)], VOCAB)
