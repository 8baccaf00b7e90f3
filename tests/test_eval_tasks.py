"""Benchmark tasks on hand-made annotation files with an injected fake answer function.

The fake stands in for FerretChat.ask_batch so that protocol, scoring, sharding, resume and
error accounting are checked exactly; tests/test_eval_end_to_end.py runs the real model.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

from ferret.eval import common, flickr, lvis, pope, refcoco
from ferret.regions import Box, Point

DATA = Path(__file__).parent / "data" / "eval"


def make_image(folder: Path, name: str, width: int, height: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 80, 40)).save(folder / name)


class FakeModel:
    """Answers from a question -> text table; records every batch it was given."""

    def __init__(self, answers: dict[str, str], default: str = "I do not know."):
        self.answers = answers
        self.default = default
        self.batches = []

    def __call__(self, items):
        self.batches.append(items)
        return [self.answers.get(question, self.default) for _, question, _ in items]


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------- refcoco

def test_refcoco_protocol_and_scoring(tmp_path):
    images = tmp_path / "images"
    make_image(images, "COCO_train2014_000000000001.jpg", 200, 100)  # image 2 is missing
    fake = FakeModel({
        # true box [10, 10, 50, 70] on 200x100 -> grid [50, 100, 250, 700]
        "What is the location of man on the left in the image?": "man on the left [50, 100, 250, 700].",
        # first box is wrong, second right: only the first counts
        "What is the location of dog right in the image?": "dog [0, 0, 100, 100] [600, 200, 900, 700]",
    })
    out = tmp_path / "out"
    metrics = refcoco.main(["--data", str(DATA / "finetune_refcoco_val.json"), "--images", str(images),
                            "--out", str(out), "--batch-size", "4", "--no-progress", "--visualize", "2"],
                           answer_fn=fake)
    assert metrics["accuracy"] == {"refcoco_val": 0.5}
    assert metrics["counts"] == {"refcoco_val": 2}
    assert metrics["missing_images"] == 1 and metrics["bad_annotations"] == 1
    assert metrics["num_unparsable"] == 0
    assert metrics["complete"]
    # commas removed from the expression, as released
    asked = [q for batch in fake.batches for _, q, _ in batch]
    assert "What is the location of man on the left in the image?" in asked
    assert len(fake.batches) == 1 and len(fake.batches[0]) == 2
    assert read_metrics(out)["accuracy"] == {"refcoco_val": 0.5}
    assert len(list((out / "visualize").glob("*.png"))) == 2


def test_refcoco_unparsable_answer_is_wrong_and_listed(tmp_path):
    images = tmp_path / "images"
    make_image(images, "COCO_train2014_000000000001.jpg", 200, 100)
    fake = FakeModel({}, default="somewhere on the left")
    metrics = refcoco.main(["--data", str(DATA / "finetune_refcoco_val.json"), "--images", str(images),
                            "--out", str(tmp_path / "out"), "--no-progress"], answer_fn=fake)
    assert metrics["overall_accuracy"] == 0.0
    assert metrics["num_unparsable"] == 2
    assert {u["text"] for u in metrics["unparsable"]} == {"somewhere on the left"}


def test_sharding_and_resume(tmp_path):
    images = tmp_path / "images"
    make_image(images, "COCO_train2014_000000000001.jpg", 200, 100)
    make_image(images, "COCO_train2014_000000000002.jpg", 100, 100)
    out = tmp_path / "out"
    args = ["--data", str(DATA / "finetune_refcoco_val.json"), "--images", str(images), "--out", str(out),
            "--no-progress", "--num-chunks", "2"]
    first = FakeModel({}, default="[0, 0, 999, 999]")
    m0 = refcoco.main(args + ["--chunk-idx", "0"], answer_fn=first)
    assert not m0["complete"] and m0["num_answered"] == 2
    m1 = refcoco.main(args + ["--chunk-idx", "1"], answer_fn=FakeModel({}, default="[0, 0, 999, 999]"))
    assert m1["complete"] and m1["num_answered"] == 3
    assert sorted(p.name for p in out.glob("predictions_*.jsonl")) == ["predictions_0_of_2.jsonl",
                                                                        "predictions_1_of_2.jsonl"]
    # Rerunning chunk 0 asks nothing: every id is already answered.
    again = FakeModel({})
    refcoco.main(args + ["--chunk-idx", "0"], answer_fn=again)
    assert again.batches == []
    # A torn last line (killed run) is dropped and only that sample is asked again.
    path = out / "predictions_0_of_2.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    retry = FakeModel({}, default="[0, 0, 999, 999]")
    refcoco.main(args + ["--chunk-idx", "0"], answer_fn=retry)
    assert sum(len(b) for b in retry.batches) == 1


def test_torchrun_environment_selects_the_shard(monkeypatch):
    assert common.resolve_shard(None, None, {"WORLD_SIZE": "4", "RANK": "3"}) == (4, 3)
    assert common.resolve_shard(None, None, {}) == (1, 0)
    assert common.resolve_shard(2, 1, {"WORLD_SIZE": "4", "RANK": "3"}) == (2, 1)
    with pytest.raises(common.EvalSetupError, match="chunk index"):
        common.resolve_shard(2, 2, {})
    assert common.shard(list(range(5)), 2, 0) == [0, 1, 2]
    assert common.shard(list(range(5)), 2, 1) == [3, 4]
    assert common.shard(list(range(2)), 4, 3) == []


def test_a_rejected_item_does_not_sink_its_batch(tmp_path):
    images = tmp_path / "images"
    make_image(images, "COCO_train2014_000000000001.jpg", 200, 100)
    make_image(images, "COCO_train2014_000000000002.jpg", 100, 100)

    def picky(items):
        if any(" cat " in q for _, q, _ in items):
            raise ValueError("region outside the image")
        return ["[0, 0, 999, 999]"] * len(items)

    metrics = refcoco.main(["--data", str(DATA / "finetune_refcoco_val.json"), "--images", str(images),
                            "--out", str(tmp_path / "out"), "--batch-size", "3", "--no-progress"], answer_fn=picky)
    assert metrics["num_answered"] == 2 and metrics["rejected_inputs"] == 1
    assert any("region outside" in e["detail"] for e in metrics["errors"])


def test_missing_annotation_file_is_reported_and_empty_input_is_an_error(tmp_path):
    images = tmp_path / "images"
    make_image(images, "COCO_train2014_000000000001.jpg", 200, 100)
    metrics = refcoco.main(["--data", str(DATA / "finetune_refcoco_val.json"), str(tmp_path / "nope.json"),
                            "--images", str(images), "--out", str(tmp_path / "out"), "--no-progress"],
                           answer_fn=FakeModel({}))
    assert any("nope.json" in e["detail"] for e in metrics["errors"])
    with pytest.raises(common.EvalSetupError, match="no usable"):
        refcoco.main(["--data", str(tmp_path / "nope.json"), "--images", str(images), "--out", str(tmp_path / "o2")],
                     answer_fn=FakeModel({}))


# ----------------------------------------------------------------------------- flickr

def test_flickr_recall_any_box_and_merged(tmp_path):
    images = tmp_path / "images"
    make_image(images, "1000.jpg", 200, 150)
    # man boxes [10,10,30,90] and [50,10,70,90] (merged [10,10,70,90]); hat [15,5,30,15]; dog [120,50,180,90].
    # On 200x150 a grid value maps to pixels by * (0.2, 0.15), truncated.
    answer = ("a man [600, 600, 700, 700] [50, 67, 150, 600], a red hat [0, 800, 100, 999], "
              "a cat [600, 333, 900, 600]")
    fake = FakeModel({"What are the locations of a man, a red hat, a dog?": answer})
    metrics = flickr.main(["--data", str(DATA / "final_flickr_separateGT_test.json"), "--images", str(images),
                           "--out", str(tmp_path / "out"), "--no-progress", "--visualize", "1"], answer_fn=fake)
    assert metrics["num_phrases"] == 3
    # man: first box wrong, second box is exactly the first man box -> miss at 1, hit at 5 and 10;
    # hat wrong; dog not grounded (the answer says "a cat").
    assert metrics["recall"]["any_box"] == {"R@1": 0.0, "R@5": pytest.approx(1 / 3), "R@10": pytest.approx(1 / 3)}
    # merged-box: one man box against the enclosing box has IoU 1600 / 4800 < 0.5.
    assert metrics["recall"]["merged_box"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0}
    assert metrics["num_ungrounded_phrases"] == 1
    assert metrics["bad_annotations"] == 1  # the caption without phrases
    assert (tmp_path / "out" / "visualize" / "1000_0.png").is_file()


def test_flickr_merged_protocol_differs_from_any_box(tmp_path):
    images = tmp_path / "images"
    make_image(images, "1000.jpg", 200, 150)
    # one box around both men: [10, 10, 70, 90] -> grid [50, 67, 350, 600]
    fake = FakeModel({}, default="a man [50, 67, 350, 600]")
    metrics = flickr.main(["--data", str(DATA / "final_flickr_separateGT_test.json"), "--images", str(images),
                           "--out", str(tmp_path / "out"), "--no-progress"], answer_fn=fake)
    assert metrics["recall"]["merged_box"]["R@1"] == pytest.approx(1 / 3)
    assert metrics["recall"]["any_box"]["R@1"] == 0.0


# ----------------------------------------------------------------------------- lvis

def test_lvis_point_and_box_accuracy(tmp_path):
    images = tmp_path / "images"
    make_image(images, "000000000101.jpg", 200, 100)
    seen = []

    def answer(items):
        texts = []
        for _, question, regions in items:
            seen.append((question, regions))
            if "teddy bear" in question:
                texts.append("It is a teddy bear, not an armchair.")
            elif isinstance(regions[0], Point):
                texts.append("A frisbee.")
            else:
                texts.append("It is a bow or a frisbee.")
        return texts

    metrics = lvis.main(["--data", str(DATA / "lvis_eval.jsonl"), "--images", str(images),
                         "--out", str(tmp_path / "out"), "--batch-size", "4", "--no-progress", "--seed", "3"],
                        answer_fn=answer)
    assert metrics["counts"] == {"box": 2, "point": 2}
    assert metrics["accuracy"] == {"box": 1.0, "point": 0.5}
    assert metrics["accuracy_strict"] == {"box": 0.5, "point": 0.5}
    assert metrics["bad_annotations"] == 2  # point outside the image; record without fields
    first, second = lvis.class_order("1", "teddy bear", "armchair", 3)
    assert (f"Is the object <region> of the image a {first} or a {second}?", (Point(40.0, 30.0),)) in seen
    boxes = [r[0] for _, r in seen if isinstance(r[0], Box)]
    assert boxes[0].coords == pytest.approx((20, 10, 80, 80))


def test_lvis_class_order_is_seeded_and_varies():
    orders = {lvis.class_order(str(i), "cat", "dog", 0) for i in range(20)}
    assert orders == {("cat", "dog"), ("dog", "cat")}
    assert lvis.class_order("7", "cat", "dog", 0) == lvis.class_order("7", "cat", "dog", 0)


# ----------------------------------------------------------------------------- pope

def test_pope_metrics_and_missing_image(tmp_path):
    images = tmp_path / "images"
    make_image(images, "COCO_val2014_000000000201.jpg", 64, 48)
    fake = FakeModel({
        "Is there a dog in the image?": "Yes, there is a dog.",
        "Is there a zebra in the image?": "No, there is no zebra.",
        "Is there a person in the image?": "",
        "Is there a kite in the image?": "Yes. No wait.",
    })
    metrics = pope.main(["--data", str(DATA / "coco_pope_random.json"), "--images", str(images),
                         "--out", str(tmp_path / "out"), "--batch-size", "2", "--no-progress"], answer_fn=fake)
    random_ = metrics["settings"]["random"]
    # dog: TP; zebra: TN; person: empty -> wrong (FN); kite: first sentence "Yes" -> FP
    assert (random_["tp"], random_["tn"], random_["fn"], random_["fp"]) == (1, 1, 1, 1)
    assert random_["accuracy"] == 0.5 and random_["yes_ratio"] == 0.5
    assert metrics["num_unparsable"] == 1 and metrics["unparsable"][0]["id"] == "random:3"
    assert metrics["missing_images"] == 1 and metrics["bad_annotations"] == 1


def test_command_line_scores_existing_predictions(tmp_path):
    """`python -m ferret.eval.pope --score-only` scores a predictions file without a model."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    records = [{"id": "random:1", "text": "Yes.", "width": 8, "height": 8},
               {"id": "random:2", "text": "Yes.", "width": 8, "height": 8}]
    (out / "predictions_0_of_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = subprocess.run([sys.executable, "-m", "ferret.eval.pope", "--score-only",
                             "--data", str(DATA / "coco_pope_random.json"), "--images", str(tmp_path),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(out)
    assert metrics["num_answered"] == 2 and not metrics["complete"]
    assert metrics["settings"]["random"]["accuracy"] == 0.5
    assert "random: accuracy=0.5000" in result.stdout


def test_flickr_recall_per_phrase_type_with_entities_folder(tmp_path):
    images = tmp_path / "images"
    make_image(images, "1000.jpg", 200, 150)
    sentences = flickr.read_sentence_phrases(DATA / "flickr_entities" / "Sentences" / "1000.txt")
    assert sentences[0][1] == {"phrase": "a red hat", "phrase_id": "2", "types": ["clothing"]}
    assert sentences[1] == []
    fake = FakeModel({}, default="a man [600, 600, 700, 700] [50, 67, 150, 600]")
    metrics = flickr.main(["--data", str(DATA / "final_flickr_separateGT_test.json"), "--images", str(images),
                           "--out", str(tmp_path / "out"), "--no-progress",
                           "--entities", str(DATA / "flickr_entities")], answer_fn=fake)
    by_type = metrics["recall_by_type"]["any_box"]
    assert by_type["people"] == {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0}
    assert by_type["clothing"]["R@5"] == 0.0 and by_type["animals"]["R@10"] == 0.0


def test_write_json_creates_its_folder_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.json"
    common.write_json(target, {"acc": 0.5, "names": ["x"]})
    assert json.loads(target.read_text()) == {"acc": 0.5, "names": ["x"]}
    common.write_json(target, {"acc": 0.75})  # an existing file is replaced whole
    assert json.loads(target.read_text()) == {"acc": 0.75}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
