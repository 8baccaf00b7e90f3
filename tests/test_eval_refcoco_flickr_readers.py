"""RefCOCO and Flickr30k evaluation read annotations through ferret.data.formats: unusable
entries are counted with the reader's message, an unreadable file stops the run."""

import json
from pathlib import Path

import pytest

from ferret.eval import common, flickr, refcoco

DATA = Path(__file__).parent / "data" / "eval"


def test_refcoco_samples_come_from_the_refexp_records(tmp_path):
    loaded = refcoco.load_samples([str(DATA / "finetune_refcoco_val.json")], str(tmp_path))
    assert [s.sample_id for s in loaded.samples] == ["refcoco_val:0", "refcoco_val:1", "refcoco_val:2"]
    first = loaded.samples[0]
    assert first.question == "What is the location of man on the left in the image?"
    assert first.meta["box"] == [10.0, 10.0, 50.0, 70.0] and (first.meta["width"], first.meta["height"]) == (200, 100)
    assert first.image == str(tmp_path / "COCO_train2014_000000000001.jpg")
    (bad,) = loaded.bad_annotations
    assert "images[3] (id 3) has 0 annotations" in bad


def test_malformed_annotation_file_is_a_setup_error(tmp_path):
    broken = tmp_path / "finetune_refcoco_val.json"
    broken.write_text('{"images": [1,, 2]}')
    with pytest.raises(common.EvalSetupError, match=r"finetune_refcoco_val\.json at line 1"):
        refcoco.load_samples([str(broken)], str(tmp_path))
    broken.write_text(json.dumps([{"caption": "a list, not COCO"}]))
    with pytest.raises(common.EvalSetupError, match="'images' and 'annotations'"):
        flickr.load_samples([str(broken)], str(tmp_path))


def test_flickr_samples_phrases_boxes_and_unscorable_captions(tmp_path):
    loaded = flickr.load_samples([str(DATA / "final_flickr_separateGT_test.json")], str(tmp_path))
    (sample,) = loaded.samples
    assert sample.sample_id == "1000_0"
    assert sample.question == "What are the locations of a man, a red hat, a dog?"
    man, hat, dog = sample.meta["phrases"]
    assert man["text"] == "A man" and man["boxes"] == [[10.0, 10.0, 30.0, 90.0], [50.0, 10.0, 70.0, 90.0]]
    assert hat["boxes"] == [[15.0, 5.0, 30.0, 15.0]] and dog["phrase"] == "a dog"
    (bad,) = loaded.bad_annotations
    assert "caption has no phrase to ground" in bad


def test_flickr_entities_folder_without_the_sentence_counts_the_caption(tmp_path):
    data = json.loads((DATA / "final_flickr_separateGT_test.json").read_text())
    data["images"][0]["sentence_id"] = 7  # the Sentences file has two sentences
    path = tmp_path / "final_flickr_separateGT_test.json"
    path.write_text(json.dumps(data))
    with pytest.raises(common.EvalSetupError, match="no usable Flickr30k samples.*sentence 7 is not in"):
        flickr.load_samples([str(path)], str(tmp_path), entities_dir=str(DATA / "flickr_entities"))
    # Without the entities folder the same caption is usable: only the per-type lookup failed.
    assert len(flickr.load_samples([str(path)], str(tmp_path)).samples) == 1
