"""The small tokenizer: building it from a synthetic corpus, and the committed asset."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ferret.constants import IMAGE_TOKEN, REGION_TOKEN
from ferret.data.build_tokenizer import build, main, sample_messages
from ferret.data.grit import load_grit_file
from ferret.data.synthetic import generate

ASSET = Path(__file__).resolve().parents[1] / "ferret" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_world")
    generate(str(out), n=40, seed=2, workers=1)
    return out


def test_build_saves_a_loadable_tokenizer(world, tmp_path):
    out = tmp_path / "tok"
    stats = build(str(world), str(out), vocab_size=500)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tok) == stats["vocab_size"] <= 500
    assert len(tok(REGION_TOKEN, add_special_tokens=False)["input_ids"]) == 1
    assert stats["region_token_id"] == tok.convert_tokens_to_ids(REGION_TOKEN)
    assert 0 < stats["mean_answer_tokens"] < stats["mean_tokens"] <= stats["max_tokens"]


def test_sample_messages_fill_placeholders_with_grid_boxes(world):
    sample = next(s for s in load_grit_file(str(world / "train.json")) if s["task"] == "ground")
    (_, question), (_, answer) = sample_messages(sample)
    x1, y1, x2, y2 = sample["box_x1y1x2y2"][1][0]
    w, h = sample["image_w"], sample["image_h"]
    assert f"[{x1 * 1000 // w}, {y1 * 1000 // h}, {x2 * 1000 // w}, {y2 * 1000 // h}]." in answer
    assert REGION_TOKEN not in answer and "bbox_location" not in question


def test_cli_rejects_empty_corpus(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(ValueError, match="no usable samples"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "tok")])


def test_committed_asset_loads_offline_and_is_compact():
    if not (ASSET / "tokenizer.json").is_file():
        pytest.skip(f"tokenizer asset not built at {ASSET}")
    tok = AutoTokenizer.from_pretrained(str(ASSET), local_files_only=True)
    for token in (REGION_TOKEN, IMAGE_TOKEN):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    answer = " A red circle.</s>"
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 6 and tok.decode(ids) == answer
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 1_000_000
