"""Out-of-generator scenes (ferret.eval.ood_scenes): deterministic, records in the generator's
exact format with tight boxes of non-empty visible masks, the promised spread of canvases,
backgrounds and object counts, and the two synthetic evaluations run on them with --split ood."""

import hashlib
import json
import re

import numpy as np
import pytest

from ferret.data.rle import decode_rle
from ferret.data.synthetic import COLORS, SHAPES, SIZE_CLASSES, SyntheticConfig, generate
from ferret.eval import ood_scenes, synthetic_report
from ferret.model.tiny import save_tiny_model
from ferret.processing import load_image
from ferret.regions import Box, format_coordinates, region_to_grid

N_SCENES = 60  # what the CLI writes by default, and what issue 13 asks for (>= 50)


@pytest.fixture(scope="module")
def ood(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ood")
    summary = ood_scenes.main(["--out", str(folder), "--n", str(N_SCENES), "--seed", "0"])
    records = json.loads((folder / "scenes_ood.json").read_text())
    meta = json.loads((folder / "ood_meta.json").read_text())
    return folder, records, meta["scenes"], summary


def test_same_seed_same_scenes_other_seed_other_scenes(tmp_path):
    first = ood_scenes.render_ood_scene(7, seed=0)
    again = ood_scenes.render_ood_scene(7, seed=0)
    other = ood_scenes.render_ood_scene(7, seed=1)
    assert np.array_equal(first.scene.image, again.scene.image)
    assert json.dumps(ood_scenes.scene_record(first.scene)) == json.dumps(ood_scenes.scene_record(again.scene))
    assert first.scene.image.shape != other.scene.image.shape or not np.array_equal(first.scene.image, other.scene.image)
    ood_scenes.generate_ood(tmp_path / "a", n=2, seed=3)
    ood_scenes.generate_ood(tmp_path / "b", n=2, seed=3)
    for name in ("scenes_ood.json", "images/ood_000000.png", "images/ood_000001.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_records_have_the_generators_exact_format(ood, tmp_path):
    _, records, _, _ = ood
    generate(str(tmp_path), 4, seed=0, config=SyntheticConfig(samples_per_scene=1, test_fraction=0.5,
                                                              min_side=96, max_side=128), workers=1)
    reference = json.loads((tmp_path / "scenes_test.json").read_text())[0]
    ref_obj = reference["objects"][0]
    for record in records:
        assert list(record) == list(reference)
        assert all(type(record[k]) is type(reference[k]) for k in reference)
        for obj in record["objects"]:
            assert list(obj) == list(ref_obj)
            assert all(type(obj[k]) is type(ref_obj[k]) for k in ref_obj)
            assert list(obj["mask"]) == list(ref_obj["mask"]) and isinstance(obj["mask"]["counts"], str)
            assert all(isinstance(v, int) for v in obj["box"])


def test_boxes_are_tight_masks_visible_names_unique_colours_right(ood):
    folder, records, _, _ = ood
    for record in records:
        width, height = record["width"], record["height"]
        image = np.asarray(load_image(folder / record["image"]).convert("RGB"))
        assert image.shape == (height, width, 3)
        names = [o["name"] for o in record["objects"]]
        assert len(names) == len(set(names)), record["scene_id"]
        union = np.zeros((height, width), dtype=int)
        for obj in record["objects"]:
            assert obj["name"] == f"{obj['color']} {obj['shape']}"
            assert obj["color"] in COLORS and obj["shape"] in SHAPES and obj["size"] in SIZE_CLASSES
            mask = decode_rle(obj["mask"], (height, width))
            assert mask.any() and obj["area"] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            assert obj["box"] == [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
            x1, y1, x2, y2 = obj["box"]
            assert min(x2 - x1 + 1, y2 - y1 + 1) >= 0.06 * min(width, height), (record["scene_id"], obj["name"])
            union += mask
            # the object's median pixel is nearest to its own colour among the world's eight
            median = np.median(image[mask].astype(float), axis=0)
            nearest = min(COLORS, key=lambda c: float(np.linalg.norm(np.array(COLORS[c]) - median)))
            assert nearest == obj["color"], (record["scene_id"], obj["name"], median.tolist())
        assert union.max() <= 1  # visible masks never share a pixel


def test_the_set_spans_sizes_backgrounds_counts_and_occlusion(ood):
    _, records, metas, summary = ood
    sizes = [(r["width"], r["height"]) for r in records]
    assert all(150 <= h <= 480 and 160 <= w <= 640 for w, h in sizes)
    assert max(w for w, _ in sizes) >= 600 and max(h for _, h in sizes) >= 450
    assert any(min(w, h) > 320 for w, h in sizes)  # the generator's sides are 160-320
    assert any(w / h > 2.05 for w, h in sizes) and any(w / h < 0.49 for w, h in sizes)  # its aspect is 0.5-2
    assert {m["size_kind"] for m in metas} == set(ood_scenes.SIZE_KINDS)
    assert {m["background"] for m in metas} == set(ood_scenes.BACKGROUND_KINDS)
    assert {len(r["objects"]) for r in records} == set(range(1, 6))
    assert {o["size"] for r in records for o in r["objects"]} == set(SIZE_CLASSES)
    fractions = [o["radius_fraction"] for m in metas for o in m["objects"]]
    assert min(fractions) >= ood_scenes.RADIUS_FRACTION[0] and max(fractions) <= ood_scenes.RADIUS_FRACTION[1]
    assert any(o["outline"] for m in metas for o in m["objects"])
    for record, meta in zip(records, metas):
        assert meta["scene_id"] == record["scene_id"] and meta["num_objects"] == len(record["objects"])
        for obj, style in zip(record["objects"], meta["objects"]):
            assert style["name"] == obj["name"]
            assert style["visible_fraction"] >= ood_scenes.MIN_VISIBLE_FRACTION
            assert style["visible_fraction"] == 1.0 or meta["occlusion_allowed"]
    assert sum(m["occlusion_allowed"] for m in metas) == 0.4 * len(metas)
    occluded = [o for m in metas for o in m["objects"] if o["visible_fraction"] < 1.0]
    assert len(occluded) >= 3  # light occlusion does happen
    assert summary["scenes"] == N_SCENES and summary["seconds"] < 60


def test_records_load_with_the_reports_loader_for_split_ood(ood):
    folder, records, _, _ = ood
    assert synthetic_report.load_scenes(folder, split="ood") == records
    assert len(synthetic_report.load_scenes(folder, max_scenes=3, split="ood")) == 3
    args = synthetic_report.build_parser().parse_args(["--data", str(folder), "--out", "x", "--split", "ood"])
    assert args.split == "ood"


class _Oracle:
    """Answers the report's four question kinds from the OOD records (found by the image's pixels)."""

    def __init__(self, folder, records):
        self.scenes = {self.key(load_image(folder / r["image"])): r for r in records}

    @staticmethod
    def key(image) -> str:
        return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()

    def grid(self, scene, name) -> str:
        obj = next(o for o in scene["objects"] if o["name"] == name)
        return format_coordinates(region_to_grid(Box(*obj["box"]), scene["width"], scene["height"]))

    def __call__(self, items):
        answers = []
        for image, question, _ in items:
            scene = self.scenes[self.key(image)]
            present = {o["name"] for o in scene["objects"]}
            if m := re.fullmatch(r"What is the location of the (.+) in the image\?", question):
                answers.append(f"The {m.group(1)} {self.grid(scene, m.group(1))}.")
            elif m := re.fullmatch(r"What are the locations of (.+)\?", question):
                phrases = m.group(1).split(", ")
                answers.append(", ".join(f"{p} {self.grid(scene, p.split(' ', 1)[1])}" for p in phrases) + ".")
            elif m := re.fullmatch(r"Is the object <region> of the image a (.+) or a (.+)\?", question):
                answers.append(f"It is a {m.group(1) if m.group(1) in present else m.group(2)}.")
            elif m := re.fullmatch(r"Is there a (.+) in the image\?", question):
                answers.append("Yes, there is." if m.group(1) in present else "No, there is not.")
            else:
                raise AssertionError(f"unexpected question {question!r}")
        return answers


def test_an_oracle_scores_perfectly_on_ood_scenes(ood, tmp_path):
    """The first 20 scenes hold every (canvas, background) pair: the exported benchmarks match the records."""
    folder, records, _, _ = ood
    report = synthetic_report.main(["--data", str(folder), "--split", "ood", "--max-scenes", "20", "--out",
                                    str(tmp_path), "--no-progress", "--batch-size", "32"],
                                   answer_fn=_Oracle(folder, records))
    summary = report["summary"]
    assert report["split"] == "ood" and report["num_scenes"] == 20
    assert summary["refcoco"]["acc@0.5"] == 1.0
    assert summary["flickr"]["any_box_R@1"] == 1.0
    assert summary["lvis"] == {"acc_box": 1.0, "acc_point": 1.0}
    assert all(summary["pope"][f"{s}_accuracy"] == 1.0 for s in ("random", "popular", "adversarial"))


@pytest.fixture
def one_thread():
    """Plumbing only: one torch thread is faster than two on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_both_evaluations_run_on_ood_scenes_with_a_tiny_model(ood, tmp_path, one_thread):
    """The one-command helper runs synthetic_report and synthetic_direct with --split ood."""
    folder, records, _, _ = ood
    model = save_tiny_model(tmp_path / "tiny")
    summary = ood_scenes.evaluate(folder, tmp_path / "eval", model_path=model, device="cpu", max_scenes=2,
                                  batch_size=16, max_new_tokens=6)
    assert summary["num_scenes"] == 2 and set(summary["naming"]) == {"box", "point", "free_form"}
    assert 0.0 <= summary["grounding_acc@0.5"] <= 1.0 and set(summary["meets"]) == {"grounding", "naming"}
    assert json.loads((tmp_path / "eval" / "ood_summary.json").read_text()) == summary
    by_size = summary["by_kind"]["size_kind"]  # scenes 0 and 1: one compact, one large canvas
    assert set(by_size) == {"compact", "large"} and set(summary["by_kind"]["background"]) == {"plain", "gaussian_noise"}
    assert sum(g["naming_count"] for g in by_size.values()) == 3 * sum(len(r["objects"]) for r in records[:2])
    assert sum(g["grounding_count"] for g in by_size.values()) == sum(len(r["objects"]) for r in records[:2])
    report = json.loads((tmp_path / "eval" / "report" / "synthetic_report.json").read_text())
    assert report["split"] == "ood" and report["num_scenes"] == 2
    assert set(report["summary"]) == {"refcoco", "flickr", "lvis", "pope"}
    assert all(report["tasks"][t]["complete"] for t in report["tasks"])
    direct = json.loads((tmp_path / "eval" / "direct" / "direct_checks.json").read_text())
    objects = sum(len(r["objects"]) for r in records[:2])
    assert direct["split"] == "ood" and direct["num_scenes"] == 2
    assert direct["counts"]["refer_box"] == direct["counts"]["refer_free_form"] == objects
