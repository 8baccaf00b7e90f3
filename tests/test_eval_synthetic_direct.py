"""Direct checks of a model on the synthetic test scenes: question building, scoring, report."""

import json

import numpy as np
import pytest

from ferret.data.synthetic import SyntheticConfig, generate
from ferret.eval import synthetic_direct
from ferret.regions import Box, FreeForm, Point


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth_direct")
    config = SyntheticConfig(samples_per_scene=1, test_fraction=0.5, val_fraction=0.1, min_side=96, max_side=144)
    generate(str(folder), 6, seed=3, config=config, workers=1)
    return folder


def test_first_name_and_scoring():
    assert synthetic_direct.first_name("It is a Red circle next to a blue star.") == "red circle"
    assert synthetic_direct.first_name("no shape here") is None
    refer = {"check": "refer_box", "expected": "blue star"}
    assert synthetic_direct.is_right(refer, "A blue star.")
    assert not synthetic_direct.is_right(refer, "A red star, near a blue star.")
    absent = {"check": "yes_no_absent", "expected": "no"}
    assert synthetic_direct.is_right(absent, "No.") and not synthetic_direct.is_right(absent, "Yes, there is.")


def test_scene_questions_cover_every_object_and_region_kind(world):
    scene = json.loads((world / "scenes_test.json").read_text())[0]
    questions = synthetic_direct.scene_questions(scene, world, np.random.default_rng(0))
    refer = [q for q in questions if q["check"].startswith("refer_")]
    assert len(refer) == 3 * len(scene["objects"])
    kinds = {type(q["regions"][0]) for q in refer}
    assert kinds == {Box, Point, FreeForm}
    for q in refer:  # every referred region lies on its object's box
        region = q["regions"][0]
        obj = next(o for o in scene["objects"] if o["name"] == q["expected"])
        x1, y1, x2, y2 = obj["box"]
        if isinstance(region, Point):
            assert x1 <= region.x <= x2 and y1 <= region.y <= y2
    answers = {q["expected"] for q in questions if q["check"].startswith("yes_no")}
    assert answers <= {"yes", "no"}


def test_report_on_the_embedded_model(world, tmp_path):
    report = synthetic_direct.main(["--data", str(world), "--out", str(tmp_path), "--max-scenes", "1"])
    saved = json.loads((tmp_path / "direct_checks.json").read_text())
    assert saved["counts"] == report["counts"] and report["counts"]["refer_box"] >= 2
    total = sum(report["counts"].values())
    right = sum(round(report["accuracy"][k] * n) for k, n in report["counts"].items())
    assert len(report["wrong"]) == total - right
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
