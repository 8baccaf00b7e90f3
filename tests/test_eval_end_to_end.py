"""Every task end to end through the real model API (FerretChat.ask_batch) on a tiny random
model: the answers are nonsense, so these check plumbing — prompts with regions reach the
model, batches equal one-by-one answers, records, metrics and resume — not accuracy."""

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from ferret.data.synthetic import SyntheticConfig, generate
from ferret.eval import common, ferret_bench, flickr, lvis, pope, refcoco, synthetic_report
from ferret.model.tiny import save_tiny_model

DATA = Path(__file__).parent / "data" / "eval"
MAX_NEW_TOKENS = "6"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def answer_fn(tiny_model):
    """One loaded tiny model for the tests that do not exercise --model-path themselves."""
    args = argparse.Namespace(model_path=str(tiny_model), device="cpu", load_4bit=False, load_8bit=False,
                              max_new_tokens=int(MAX_NEW_TOKENS), temperature=0.0)
    return common.load_answer_fn(args)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    colours = {"COCO_train2014_000000000001.jpg": (200, 100), "COCO_train2014_000000000002.jpg": (100, 100),
               "1000.jpg": (200, 150), "000000000101.jpg": (200, 100), "COCO_val2014_000000000201.jpg": (64, 48),
               "000000000301.jpg": (200, 100), "000000000302.jpg": (120, 90)}
    for k, (name, size) in enumerate(colours.items()):
        Image.new("RGB", size, (40 * k % 255, 90, 160)).save(folder / name)
    return folder


def records(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("predictions_*.jsonl")) for r in common.read_jsonl(p)]


def test_refcoco_with_model_path_batched_equals_one_by_one(tiny_model, images, tmp_path):
    base = ["--model-path", str(tiny_model), "--device", "cpu", "--data", str(DATA / "finetune_refcoco_val.json"),
            "--images", str(images), "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress"]
    batched = refcoco.main(base + ["--out", str(tmp_path / "b"), "--batch-size", "3", "--visualize", "1"])
    single = refcoco.main(base + ["--out", str(tmp_path / "s"), "--batch-size", "1"])
    assert batched["num_answered"] == 3 and batched["complete"]
    assert 0.0 <= batched["overall_accuracy"] <= 1.0
    texts_b = {r["id"]: r["text"] for r in records(tmp_path / "b")}
    texts_s = {r["id"]: r["text"] for r in records(tmp_path / "s")}
    assert texts_b == texts_s and all(isinstance(t, str) for t in texts_b.values())
    assert batched["overall_accuracy"] == single["overall_accuracy"]
    assert len(list((tmp_path / "b" / "visualize").glob("*.png"))) == 1


def test_flickr_lvis_pope_end_to_end(answer_fn, images, tmp_path):
    common_args = ["--images", str(images), "--batch-size", "2", "--no-progress"]
    m = flickr.main(["--data", str(DATA / "final_flickr_separateGT_test.json"), "--out", str(tmp_path / "f"),
                     *common_args], answer_fn=answer_fn)
    assert m["num_answered"] == 1 and m["num_phrases"] == 3
    m = lvis.main(["--data", str(DATA / "lvis_eval.jsonl"), "--out", str(tmp_path / "l"), *common_args],
                  answer_fn=answer_fn)
    # the two valid objects, each as a point and as a box: all four reached the model
    assert m["num_answered"] == 4 and set(m["accuracy"]) == {"point", "box"}
    m = pope.main(["--data", str(DATA / "coco_pope_random.json"), "--out", str(tmp_path / "p"), *common_args],
                  answer_fn=answer_fn)
    assert m["num_answered"] == 4 and m["missing_images"] == 1
    assert 0.0 <= m["settings"]["random"]["accuracy"] <= 1.0


def test_ferret_bench_end_to_end_offline_judge(answer_fn, images, tmp_path, monkeypatch):
    monkeypatch.delenv("FERRET_JUDGE_URL", raising=False)
    m = ferret_bench.main(["--data", str(DATA / "ferret_bench"), "--images", str(images), "--out", str(tmp_path),
                           "--batch-size", "3", "--no-progress"], answer_fn=answer_fn)
    assert m["judge"] == "offline-heuristic (not GPT-4)"
    assert m["num_answered"] == 3 and m["num_reviews"] == 3
    assert set(m["scores"]) == {"all", "refer_desc", "ground_conv"}
    reviews = common.read_jsonl(tmp_path / "reviews.jsonl")
    assert {r["id"] for r in reviews} == {"refer_desc:0", "refer_desc:1", "ground_conv:5"}


def test_synthetic_report_end_to_end(tiny_model, tmp_path):
    world = tmp_path / "world"
    config = SyntheticConfig(samples_per_scene=1, test_fraction=0.4, val_fraction=0.1, min_side=96, max_side=128)
    generate(str(world), 6, seed=1, config=config, workers=1)
    report = synthetic_report.main(["--data", str(world), "--out", str(tmp_path / "out"), "--model-path",
                                    str(tiny_model), "--device", "cpu", "--max-scenes", "2", "--batch-size", "8",
                                    "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress"])
    assert set(report["summary"]) == {"refcoco", "flickr", "lvis", "pope"}
    assert all(report["tasks"][t]["complete"] for t in report["tasks"])
    saved = json.loads((tmp_path / "out" / "synthetic_report.json").read_text())
    assert saved["num_scenes"] == 2 and saved["seconds"] > 0


def test_no_model_path_and_no_embedded_model_is_a_clear_error(images, tmp_path, monkeypatch):
    from ferret.model import builder

    monkeypatch.delenv("FERRET_MODEL_PATH", raising=False)
    monkeypatch.setattr(builder, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    with pytest.raises(common.EvalSetupError, match="no --model-path given"):
        pope.main(["--data", str(DATA / "coco_pope_random.json"), "--images", str(images), "--out", str(tmp_path),
                   "--device", "cpu", "--no-progress"])


def test_missing_model_path_is_a_clear_error(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        pope.main(["--model-path", str(tmp_path / "nope"), "--data", str(DATA / "coco_pope_random.json"),
                   "--images", str(images), "--out", str(tmp_path / "o"), "--no-progress"])
