"""Synthetic report: the exported benchmark files are consistent with the scenes — an oracle
that knows each scene scores perfectly on all four tasks, a contrary one scores zero."""

import hashlib
import json
import re

import numpy as np
import pytest

from ferret.data.synthetic import SyntheticConfig, generate
from ferret.eval import synthetic_report
from ferret.processing import load_image
from ferret.regions import Box, region_to_grid, format_coordinates


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    config = SyntheticConfig(samples_per_scene=1, test_fraction=0.5, val_fraction=0.1, min_side=96, max_side=144)
    generate(str(folder), 8, seed=5, config=config, workers=1)
    return folder


def image_key(image) -> str:
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


class Oracle:
    """Answers from the scene records (found by the image's pixels); `contrary` answers wrongly."""

    def __init__(self, folder, contrary=False):
        scenes = json.loads((folder / "scenes_test.json").read_text())
        self.scenes = {image_key(load_image(folder / s["image"])): s for s in scenes}
        self.contrary = contrary
        self.questions = 0

    def grid(self, scene, name):
        obj = next(o for o in scene["objects"] if o["name"] == name)
        if self.contrary:  # a box in the opposite corner
            return "[0, 0, 5, 5]"
        return format_coordinates(region_to_grid(Box(*obj["box"]), scene["width"], scene["height"]))

    def __call__(self, items):
        answers = []
        for image, question, regions in items:
            self.questions += 1
            scene = self.scenes[image_key(image)]
            present = {o["name"] for o in scene["objects"]}
            if m := re.fullmatch(r"What is the location of the (.+) in the image\?", question):
                answers.append(f"The {m.group(1)} {self.grid(scene, m.group(1))}.")
            elif m := re.fullmatch(r"What are the locations of (.+)\?", question):
                phrases = m.group(1).split(", ")
                answers.append(", ".join(f"{p} {self.grid(scene, p.split(' ', 1)[1])}" for p in phrases) + ".")
            elif m := re.fullmatch(r"Is the object <region> of the image a (.+) or a (.+)\?", question):
                right = m.group(1) if m.group(1) in present else m.group(2)
                wrong = m.group(2) if right == m.group(1) else m.group(1)
                answers.append(f"It is a {wrong if self.contrary else right}.")
            elif m := re.fullmatch(r"Is there a (.+) in the image\?", question):
                yes = (m.group(1) in present) != self.contrary
                answers.append("Yes, there is." if yes else "No, there is not.")
            else:
                raise AssertionError(f"unexpected question {question!r}")
        return answers


def test_exports_have_the_released_shapes(world):
    scenes = synthetic_report.load_scenes(world)
    refexp = synthetic_report.export_refcoco(scenes)
    assert len(refexp["images"]) == len(refexp["annotations"]) == sum(
        len(synthetic_report.unique_objects(s)) for s in scenes)
    flickr = synthetic_report.export_flickr(scenes)
    for entry in flickr["images"]:
        phrases = [entry["caption"][s[0][0]:s[0][1]] for s in entry["tokens_positive_eval"]]
        assert all(re.fullmatch(r"[Aa] \w+ \w+", p) for p in phrases)
    pope = synthetic_report.export_pope(scenes, seed=0)
    for setting, records in pope.items():
        labels = [r["label"] for r in records]
        assert labels.count("yes") == labels.count("no"), setting
    for record in synthetic_report.export_lvis(scenes, seed=0):
        assert record["neg_class"] != record["name"]
        assert 0 <= record["sample_point"][0] < record["width"]


def test_oracle_scores_perfectly_and_contrary_scores_zero(world, tmp_path):
    oracle = Oracle(world)
    report = synthetic_report.main(["--data", str(world), "--out", str(tmp_path / "good"), "--no-progress",
                                    "--batch-size", "4", "--visualize", "1"], answer_fn=oracle)
    summary = report["summary"]
    assert summary["refcoco"]["acc@0.5"] == 1.0
    assert summary["flickr"]["any_box_R@1"] == 1.0 and summary["flickr"]["merged_box_R@1"] == 1.0
    assert summary["lvis"] == {"acc_box": 1.0, "acc_point": 1.0}
    assert all(summary["pope"][f"{s}_accuracy"] == 1.0 for s in ("random", "popular", "adversarial"))
    assert all(summary["pope"][f"{s}_yes_ratio"] == 0.5 for s in ("random", "popular", "adversarial"))
    saved = json.loads((tmp_path / "good" / "synthetic_report.json").read_text())
    assert saved["summary"] == summary and saved["num_scenes"] == 4
    assert (tmp_path / "good" / "refcoco" / "visualize").is_dir()

    contrary = synthetic_report.main(["--data", str(world), "--out", str(tmp_path / "bad"), "--no-progress"],
                                     answer_fn=Oracle(world, contrary=True))["summary"]
    assert contrary["refcoco"]["acc@0.5"] == 0.0
    assert contrary["flickr"]["any_box_R@1"] == 0.0
    assert contrary["lvis"] == {"acc_box": 0.0, "acc_point": 0.0}
    assert contrary["pope"]["random_accuracy"] == 0.0


def test_missing_scenes_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="scenes_test.json"):
        synthetic_report.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")], answer_fn=lambda items: [])
