"""The synthetic GRIT world: determinism, splits, geometry of masks/boxes, task families."""

import filecmp
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from ferret.data import synthetic
from ferret.data.rle import decode_rle
from ferret.data.synthetic import (COLORS, SHAPE_PROPORTIONS, SHAPES, SyntheticConfig, generate, render_scene,
                                    shape_coverage, shape_mask)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate(str(out), n=240, seed=3, workers=1)
    return out, summary


def _load(out, name):
    with open(os.path.join(out, name)) as handle:
        return json.load(handle)


def test_same_seed_gives_identical_files(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    generate(str(again), n=240, seed=3, workers=2)  # worker count must not matter
    for name in ("train.json", "val.json", "test.json", "scenes_test.json"):
        assert filecmp.cmp(out / name, again / name, shallow=False), name
    images = sorted(os.listdir(out / "images"))
    assert images == sorted(os.listdir(again / "images"))
    for name in images[:10]:
        assert filecmp.cmp(out / "images" / name, again / "images" / name, shallow=False)


def test_other_seed_differs(tmp_path):
    a = render_scene(0, seed=1)
    b = render_scene(0, seed=2)
    assert a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)


def test_counts_and_splits_share_no_scene(world):
    out, summary = world
    splits = {s: _load(out, f"{s}.json") for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 240 == summary["samples"]
    scenes = {s: {x["scene_id"] for x in v} for s, v in splits.items()}
    assert scenes["val"] and scenes["test"]
    assert not scenes["train"] & scenes["val"]
    assert not scenes["train"] & scenes["test"]
    assert not scenes["val"] & scenes["test"]
    assert {r["scene_id"] for r in _load(out, "scenes_test.json")} == scenes["test"]


def test_every_task_family_is_present(world):
    _, summary = world
    assert set(summary["task_counts"]) == set(synthetic.TASK_WEIGHTS)
    assert summary["free_form_samples"] > 0
    for sub in ("relation/left", "relation/above", "relation/largest", "negative/absent", "negative/present",
                "refer_attribute/color", "refer_attribute/size", "ground/refcoco", "grounded_caption/flickr",
                "refer_object/lvis"):
        assert summary["subtask_counts"].get(sub, 0) > 0, sub


def test_boxes_are_tight_around_visible_masks_and_masks_do_not_overlap(world):
    out, _ = world
    for record in _load(out, "scenes_test.json")[:5]:
        image = np.asarray(Image.open(out / record["image"]))
        assert image.shape == (record["height"], record["width"], 3)
        union = np.zeros((record["height"], record["width"]), dtype=int)
        for obj in record["objects"]:
            mask = decode_rle(obj["mask"], (record["height"], record["width"]))
            ys, xs = np.nonzero(mask)
            assert obj["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]
            assert obj["area"] == mask.sum()
            assert obj["name"] == f"{obj['color']} {obj['shape']}"
            union += mask
            # Visible pixels carry the object's colour (jitter +-18 and a little noise).
            mean = image[mask].mean(axis=0)
            assert np.abs(mean - np.array(COLORS[obj["color"]])).max() < 30
        assert union.max() == 1


def test_samples_match_their_scene(world):
    out, _ = world
    all_names = [f"{c} {s}" for c in COLORS for s in SHAPES]
    scenes = {r["scene_id"]: r for r in _load(out, "scenes_test.json")}
    for sample in _load(out, "test.json"):
        scene = scenes[sample["scene_id"]]
        assert sample["image"] == scene["image"]
        assert (sample["image_w"], sample["image_h"]) == (scene["width"], scene["height"])
        boxes = [o["box"] for o in scene["objects"]]
        names = [o["name"] for o in scene["objects"]]
        human, gpt = sample["conversations"]
        assert human["value"].startswith("<image>\n")
        for turn_boxes, turn_masks in zip(sample["box_x1y1x2y2"], sample["masks"]):
            for box, rle in zip(turn_boxes, turn_masks):
                assert box in boxes
                # Referred regions may be left unsegmented (plain box), never a wrong mask.
                assert rle == scene["objects"][boxes.index(box)]["mask"] or (rle is None and "scribbles" not in sample)
        if sample["task"] == "negative" and sample["subtask"] == "absent":
            assert gpt["value"] == "No." and sample["box_x1y1x2y2"] == [[], []]
            asked = human["value"].split("Is there a ")[1].split(" in the image?")[0]
            assert asked not in names
        if sample["task"] == "refer_object":
            obj = scene["objects"][boxes.index(sample["box_x1y1x2y2"][0][0])]
            assert gpt["value"].lower() in (f"a {obj['name']}.", f"an {obj['name']}.")
        if sample["task"] == "ground":
            question = human["value"].split("\n", 1)[1]
            prefix, suffix = (("What is the location of the ", " in the image?") if sample["subtask"] == "refcoco"
                              else ("Where is the ", "?"))
            assert question.startswith(prefix) and question.endswith(suffix)
            name = question[len(prefix):-len(suffix)]
            assert sample["box_x1y1x2y2"][1] == [boxes[names.index(name)]]
        if sample["subtask"] == "lvis":
            first, second = human["value"].split(" of the image a ")[1].rstrip("?").split(" or a ")
            obj = scene["objects"][boxes.index(sample["box_x1y1x2y2"][0][0])]
            assert obj["name"] in (first, second) and {first, second} - {obj["name"]} <= set(all_names) - set(names)
        if sample["subtask"] == "flickr":
            asked = human["value"].split("What are the locations of ")[1].rstrip("?").split(", ")
            assert asked == [f"a {names[boxes.index(b)]}" for b in sample["box_x1y1x2y2"][1]]


def test_free_form_scribbles_lie_on_their_object(world):
    out, _ = world
    found = 0
    for sample in _load(out, "train.json"):
        if "scribbles" not in sample:
            continue
        found += 1
        hw = (sample["image_h"], sample["image_w"])
        for rle, scribble in zip(sample["masks"][0], sample["scribbles"][0]):
            obj, mark = decode_rle(rle, hw), decode_rle(scribble, hw)
            assert mark.any() and not (mark & ~obj).any()
    assert found > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_are_drawn_where_asked(shape):
    mask = shape_mask(shape, 50, 40, 20, 0.0, 100, 80)
    ys, xs = np.nonzero(mask)
    assert 30 <= xs.mean() <= 70 and 20 <= ys.mean() <= 60
    assert xs.min() >= 29 and xs.max() <= 71
    if shape == "ring":
        assert not mask[40, 50]  # the hole
    else:
        assert mask[40, 50]


def test_unknown_shape_and_bad_n_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("blob", 5, 5, 3, 0, 10, 10)
    with pytest.raises(ValueError, match="positive"):
        generate(str(tmp_path), n=0)


def test_scene_objects_keep_min_visibility():
    config = SyntheticConfig()
    for scene_id in range(20):
        scene = render_scene(scene_id, seed=0, config=config)
        assert config.min_objects <= len(scene.objects) <= config.max_objects
        assert config.min_side <= scene.width <= config.max_side
        names = [o.name for o in scene.objects]
        assert len(set(names)) == len(names)


def test_chained_turns_keep_every_question_and_render_through_the_loader(tmp_path):
    from transformers import AutoTokenizer

    from ferret.data.grit import DataSource, GritDataConfig, GritDataset
    from ferret.processing import build_image_processor

    single = generate(str(tmp_path / "single"), n=30, seed=5, workers=1)
    chained = generate(str(tmp_path / "chained"), n=30, seed=5, workers=1, config=SyntheticConfig(turns_per_sample=3))
    # Same questions and answers, fewer records: 5 pairs per scene -> a 3-turn and a 2-turn sample.
    assert chained["subtask_counts"] == single["subtask_counts"]
    assert chained["samples_per_split"]["train"] == 2 * single["samples_per_split"]["train"] // 5
    flat = [t for s in _load(tmp_path / "single", "train.json") for t in s["conversations"]]
    records = _load(tmp_path / "chained", "train.json")
    turns = [t for s in records for t in s["conversations"]]
    strip = lambda t: t["value"].replace("<image>\n", "")  # noqa: E731
    assert [strip(t) for t in turns] == [strip(t) for t in flat]
    for record in records:
        n = len(record["conversations"])
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in record["conversations"][1:])
        assert len(record["box_x1y1x2y2"]) == len(record["masks"]) == n == 2 * len(record["turn_tasks"])
    tokenizer = AutoTokenizer.from_pretrained("ferret/assets/tokenizer")
    dataset = GritDataset.from_sources([DataSource(str(tmp_path / "chained" / "train.json"))], tokenizer,
                                       build_image_processor(56), GritDataConfig())
    region_id = tokenizer.convert_tokens_to_ids("<region_fea>")
    real = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert int((item["input_ids"] == region_id).sum()) == len(item["region_masks"])
        real.append(len(item["input_ids"]))
    # The length-grouped sampler's cheap lengths order the samples as their token counts do.
    rank = lambda values: np.argsort(np.argsort(values))  # noqa: E731
    assert np.corrcoef(rank(dataset.rough_lengths()), rank(real))[0, 1] > 0.8


def test_one_object_curriculum_world_asks_everything_but_relations(tmp_path):
    # The curriculum world (issue 13): every name has exactly one answer in its image.
    synthetic.main(["--out", str(tmp_path), "--n", "120", "--seed", "5", "--workers", "1",
                    "--min-objects", "1", "--max-objects", "1"])
    records = _load(tmp_path, "scenes_train.json") + _load(tmp_path, "scenes_val.json")
    assert records and all(len(r["objects"]) == 1 for r in records)
    summary = _load(tmp_path, "meta.json")
    assert "relation" not in summary["task_counts"]
    assert set(summary["task_counts"]) == set(synthetic.TASK_WEIGHTS) - {"relation"}
    assert summary["config"]["max_objects"] == 1


def test_object_count_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--min-objects", "3", "--max-objects", "2"])
    assert "--min-objects" in capsys.readouterr().err


def test_an_object_count_that_cannot_fit_fails_with_a_message():
    config = SyntheticConfig(min_objects=30, max_objects=30, min_side=64, max_side=64)
    with pytest.raises(ValueError, match="min_objects=30"):
        render_scene(0, seed=0, config=config)


def test_the_cli_reports_an_impossible_world_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--n", "5", "--workers", "1", "--min-side", "64", "--max-side", "64",
                        "--min-objects", "30", "--max-objects", "30"])
    err = capsys.readouterr().err
    assert "min_objects=30" in err and "Traceback" not in err


def test_task_weight_flag_shifts_the_question_mix(tmp_path):
    # More yes/no questions (issue 13): same scenes as the default world, more "negative" samples.
    base, more = tmp_path / "base", tmp_path / "more"
    common = ["--n", "400", "--seed", "3", "--workers", "1"]
    synthetic.main(["--out", str(base)] + common)
    synthetic.main(["--out", str(more)] + common + ["--task-weight", "negative=0.9"])
    counts = _load(base, "meta.json")["task_counts"], _load(more, "meta.json")["task_counts"]
    assert counts[1]["negative"] > 1.5 * counts[0]["negative"]
    assert _load(more, "meta.json")["config"]["task_weights"]["negative"] == 0.9
    assert _load(base, "scenes_val.json") == _load(more, "scenes_val.json")


@pytest.mark.parametrize("item, message", [("negatve=0.3", "FAMILY one of"), ("negative", "FAMILY=WEIGHT"),
                                           ("negative=x", "not a number"), ("negative=-1", ">= 0")])
def test_bad_task_weights_are_refused_in_one_line(tmp_path, capsys, item, message):
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--n", "5", "--task-weight", item])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bigger_world_keeps_the_smaller_worlds_held_out_splits(tmp_path):
    # More training scenes without moving val/test: later scenes all go to train.
    small, big = tmp_path / "small", tmp_path / "big"
    common = ["--seed", "3", "--workers", "1", "--samples-per-scene", "2"]
    synthetic.main(["--out", str(small), "--n", "80"] + common)
    synthetic.main(["--out", str(big), "--n", "160", "--split-scenes", "40"] + common)
    for split in ("val", "test"):
        assert _load(small, f"{split}.json") == _load(big, f"{split}.json"), split
        assert _load(small, f"scenes_{split}.json") == _load(big, f"scenes_{split}.json"), split
    train_small = {x["scene_id"] for x in _load(small, "train.json")}
    train_big = {x["scene_id"] for x in _load(big, "train.json")}
    assert train_small < train_big and train_big - train_small == set(range(40, 80))
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "bad"), "--n", "5", "--split-scenes", "-1"])


def test_max_rotation_bounds_the_turn_of_every_shape(monkeypatch):
    # --max-rotation 180 draws shapes at any angle; the default world keeps +-20. The angle
    # reaches shape_mask unchanged, so watch it there.
    angles = []
    real = synthetic.shape_mask

    def recording(shape, cx, cy, radius, angle, width, height):
        angles.append(angle)
        return real(shape, cx, cy, radius, angle, width, height)

    monkeypatch.setattr(synthetic, "shape_mask", recording)
    for limit in (20.0, 180.0):
        angles.clear()
        for scene_id in range(30):
            render_scene(scene_id, seed=0, config=SyntheticConfig(max_rotation=limit))
        assert max(abs(a) for a in angles) <= limit
        assert max(angles) > 0.8 * limit and min(angles) < -0.8 * limit, limit
    assert SyntheticConfig().max_rotation == 20.0


def test_max_rotation_flag_draws_that_world_and_is_checked(tmp_path, capsys):
    common = ["--seed", "3", "--workers", "1", "--n", "10"]
    synthetic.main(["--out", str(tmp_path / "cli20"), "--max-rotation", "20"] + common)
    generate(str(tmp_path / "api20"), n=10, seed=3, config=SyntheticConfig(), workers=1)
    synthetic.main(["--out", str(tmp_path / "any"), "--max-rotation", "180"] + common)
    image = "images/scene_000000.png"
    assert filecmp.cmp(tmp_path / "cli20" / image, tmp_path / "api20" / image, shallow=False)
    assert not filecmp.cmp(tmp_path / "cli20" / image, tmp_path / "any" / image, shallow=False)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "bad"), "--max-rotation", "200"] + common)
    assert "--max-rotation must be in [0, 180] degrees" in capsys.readouterr().err


def _scene_digest(scene) -> str:
    digest = hashlib.sha256(scene.image.tobytes())
    for obj in scene.objects:
        digest.update(obj.mask.tobytes())
        digest.update(str(obj.box).encode())
    return digest.hexdigest()[:16]


def test_default_world_draws_pixel_for_pixel_as_before_shape_variety():
    # Digests taken before `shape_variety` existed: every world trained so far must redraw unchanged.
    expected = {0: "c37c3f7a09c35da6", 1: "73fba88b75c949ec", 7: "2578b83adcbc2862"}
    assert {sid: _scene_digest(render_scene(sid, seed=0)) for sid in expected} == expected


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_coverage_is_the_antialiased_mask(shape):
    coverage = shape_coverage(shape, 50.3, 40.6, 20, 10.0, 100, 80)
    mask = shape_mask(shape, 50.3, 40.6, 20, 10.0, 100, 80)
    assert coverage.dtype == np.float32 and coverage.min() >= 0 and coverage.max() <= 1
    edge = (coverage > 0.05) & (coverage < 0.95)
    assert edge.sum() > 20  # soft edges
    # the same shape: the coverage's >= 0.5 pixels and the hard mask differ only along the edge
    assert ((coverage >= 0.5) != mask).sum() <= 0.15 * mask.sum()
    assert not coverage[:, :25].any() and not coverage[:12].any()  # nothing outside the shape's window


@pytest.mark.parametrize("angle", [20.0, 45.0])
def test_shape_coverage_keeps_a_turned_squares_corners(angle):
    # The widest square (half side 0.92 r) turned reaches up to 1.3 r from its centre, past the radius;
    # the anti-aliased drawing must reach as far as the hard one (their edges differ by under a pixel).
    coverage = shape_coverage("square", 60.3, 60.6, 30, angle, 120, 120, proportion=0.92)
    mask = shape_mask("square", 60.3, 60.6, 30, angle, 120, 120, proportion=0.92)
    soft, hard = synthetic._tight_box(coverage >= 0.5), synthetic._tight_box(mask)
    assert max(abs(a - b) for a, b in zip(soft, hard)) <= 1, (soft, hard)


def test_shape_proportion_changes_the_shape_within_its_range():
    for shape, (default, (low, high)) in SHAPE_PROPORTIONS.items():
        assert low < default < high, shape
        thin, thick = (shape_mask(shape, 50, 50, 30, 0.0, 100, 100, proportion=p).sum() for p in (low, high))
        # a bigger half side / arm / inner radius fills more, except for the ring, whose hole grows
        assert (thin > thick) if shape == "ring" else (thin < thick), shape
        assert np.array_equal(shape_mask(shape, 50, 50, 30, 0.0, 100, 100, proportion=default),
                              shape_mask(shape, 50, 50, 30, 0.0, 100, 100)), shape


def test_shape_variety_world_varies_proportions_and_softens_edges(monkeypatch):
    config = SyntheticConfig(shape_variety=True)
    proportions = {shape: [] for shape in SHAPE_PROPORTIONS}
    real = synthetic.shape_coverage

    def recording(shape, cx, cy, radius, angle, width, height, proportion=None, **kwargs):
        if shape in proportions:
            proportions[shape].append(proportion)
        return real(shape, cx, cy, radius, angle, width, height, proportion, **kwargs)

    monkeypatch.setattr(synthetic, "shape_coverage", recording)
    scenes = [render_scene(sid, seed=0, config=config) for sid in range(40)]
    for shape, drawn in proportions.items():
        low, high = SHAPE_PROPORTIONS[shape][1]
        assert len(drawn) >= 5 and all(low <= p <= high for p in drawn), shape
        assert max(drawn) - min(drawn) > 0.4 * (high - low), shape  # really varied, not one value
    # deterministic, and different from the default world's drawing of the same scene
    assert _scene_digest(render_scene(3, seed=0, config=config)) == _scene_digest(scenes[3])
    assert _scene_digest(scenes[3]) != _scene_digest(render_scene(3, seed=0))
    for scene in scenes:
        for obj in scene.objects:
            assert obj.mask.any() and obj.box == synthetic._tight_box(obj.mask)
    # anti-aliased: pixels just outside an object's mask carry a blend of its colour and the background
    scene = scenes[0]
    obj = scene.objects[0]
    padded = np.pad(obj.mask, 1)
    grown = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    ring = grown & ~obj.mask
    for other in scene.objects:
        ring &= ~other.mask
    colour = np.array(COLORS[obj.color], np.float32)
    inside = np.abs(scene.image[obj.mask].astype(np.float32) - colour).sum(axis=1)
    outside = np.abs(scene.image[ring].astype(np.float32) - colour).sum(axis=1)
    assert np.median(inside) < np.median(outside)


def test_shape_variety_flag_writes_that_world(tmp_path):
    common = ["--seed", "3", "--workers", "1", "--n", "10"]
    synthetic.main(["--out", str(tmp_path / "plain"), *common])
    synthetic.main(["--out", str(tmp_path / "varied"), "--shape-variety", *common])
    meta = json.loads((tmp_path / "varied" / "meta.json").read_text())
    assert meta["config"]["shape_variety"] is True
    assert json.loads((tmp_path / "plain" / "meta.json").read_text())["config"]["shape_variety"] is False
    plain = np.asarray(Image.open(tmp_path / "plain" / "images" / "scene_000000.png"))
    varied = np.asarray(Image.open(tmp_path / "varied" / "images" / "scene_000000.png"))
    assert plain.shape == varied.shape and not np.array_equal(plain, varied)


def test_min_radius_reaches_smaller_objects_and_is_checked(tmp_path):
    def small_radii(config):
        return [obj.radius / min(scene.width, scene.height) for sid in range(60)
                for scene in [render_scene(sid, seed=0, config=config)] for obj in scene.objects if obj.size == "small"]

    default, smaller = small_radii(SyntheticConfig()), small_radii(SyntheticConfig(min_radius=0.05))
    assert min(default) >= 0.08 and max(default) <= 0.11
    assert min(smaller) < 0.06 and max(smaller) <= 0.11 and sum(r < 0.08 for r in smaller) > 0.3 * len(smaller)
    for bad in ("0.02", "0.2"):
        with pytest.raises(SystemExit):
            synthetic.main(["--out", str(tmp_path / "bad"), "--n", "5", "--min-radius", bad])


def _absent_names(config, scenes=40):
    """(asked name, the scene's (colour, shape) pairs) of every absent-name question in `scenes` scenes."""
    from ferret.data.synthetic import build_samples

    asked = []
    for sid in range(scenes):
        scene = render_scene(sid, seed=0, config=config)
        present = {(o.color, o.shape) for o in scene.objects}
        for sample in build_samples(scene, 0, 12, config):
            if sample["subtask"] == "absent":
                words = sample["conversations"][0]["value"].split("Is there a ")[1].split(" in the image")[0].split()
                asked.append(((words[0], words[1]), present))
    return asked


def test_colour_negative_share_asks_for_present_colours_with_absent_shapes(tmp_path):
    weights = dict(synthetic.TASK_WEIGHTS, negative=4.0)
    default = _absent_names(SyntheticConfig(task_weights=weights))
    every = _absent_names(SyntheticConfig(task_weights=weights, colour_negative_share=1.0))
    assert len(default) > 50 and len(every) > 50
    for name, present in default + every:
        assert name not in present  # still absent
    sharing = [sum(name[0] in {c for c, _ in present} for name, present in names) / len(names)
               for names in (default, every)]
    assert sharing[0] < 0.8 and sharing[1] == 1.0
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            synthetic.main(["--out", str(tmp_path / "bad"), "--n", "5", "--colour-negative-share", bad])


def _colour_twin_share(config: SyntheticConfig, scenes: int = 80) -> float:
    """Share of the objects whose scene has another object of the same colour."""
    twins = total = 0
    for scene_id in range(scenes):
        colours = [obj.color for obj in render_scene(scene_id, seed=0, config=config).objects]
        twins += sum(colours.count(c) > 1 for c in colours)
        total += len(colours)
    return twins / total


def test_colour_repeat_share_gives_objects_colour_twins_and_keeps_names_unique(tmp_path):
    default, repeated = _colour_twin_share(SyntheticConfig()), _colour_twin_share(SyntheticConfig(colour_repeat_share=0.8))
    assert default < 0.3 and repeated > default + 0.25
    for scene_id in range(20):
        names = [obj.name for obj in render_scene(scene_id, seed=0, config=SyntheticConfig(colour_repeat_share=1.0)).objects]
        assert len(names) == len(set(names))
    # off (None or 0) draws the default world scene for scene
    for config in (SyntheticConfig(colour_repeat_share=None), SyntheticConfig(colour_repeat_share=0.0)):
        assert _scene_digest(render_scene(5, seed=0, config=config)) == _scene_digest(render_scene(5, seed=0))
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            synthetic.main(["--out", str(tmp_path / "bad"), "--n", "5", "--colour-repeat-share", bad])


def test_pixel_noise_flag_noises_the_pixels_and_keeps_the_objects(tmp_path):
    args = ["--n", "6", "--seed", "3", "--workers", "1"]
    synthetic.main(["--out", str(tmp_path / "clean"), *args])
    synthetic.main(["--out", str(tmp_path / "noisy"), *args, "--pixel-noise", "12"])
    clean = json.loads((tmp_path / "clean" / "meta.json").read_text())
    noisy = json.loads((tmp_path / "noisy" / "meta.json").read_text())
    assert clean["config"]["pixel_noise"] == 0.0 and noisy["config"]["pixel_noise"] == 12.0
    # the same objects, masks and boxes: the noise is drawn after the scene is laid out
    assert ((tmp_path / "clean" / "scenes_train.json").read_text()
            == (tmp_path / "noisy" / "scenes_train.json").read_text())
    images = sorted(p.name for p in (tmp_path / "clean" / "images").iterdir())
    assert images and images == sorted(p.name for p in (tmp_path / "noisy" / "images").iterdir())
    for name in images:
        a = np.asarray(Image.open(tmp_path / "clean" / "images" / name), np.float32)
        b = np.asarray(Image.open(tmp_path / "noisy" / "images" / name), np.float32)
        assert a.shape == b.shape
        # sigma in [0.4, 1] x 12, the same draw on the three channels (clipping trims it a little)
        assert 3.0 < float((b - a).std()) < 13.0, name
    for bad in ("-1", "100"):
        with pytest.raises(SystemExit):
            synthetic.main(["--out", str(tmp_path / "bad"), "--n", "5", "--pixel-noise", bad])
