"""RefCOCO-family and Flickr30k-Entities annotation readers (MDETR-style COCO json)."""

import json

import pytest

from ferret.data.errors import DataFormatError
from ferret.data.formats import load_flickr, load_refexp, xywh_to_xyxy


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


REFEXP = {
    "images": [
        {"id": 7, "file_name": "COCO_train2014_000000000009.jpg", "caption": "the man, on the left",
         "width": 640, "height": 480, "dataset_name": "refcocog", "sentence_id": 3, "original_id": 99},
        {"id": 8, "file_name": "COCO_train2014_000000000010.jpg", "caption": "red car",
         "width": 320, "height": 200},
    ],
    "annotations": [
        {"id": 1, "image_id": 7, "bbox": [10, 20, 100, 50.5], "category_id": 1},
        {"id": 2, "image_id": 8, "bbox": [0, 0, 320, 200], "category_id": 3},
    ],
}


def test_refexp_records(tmp_path):
    records = load_refexp(_write(tmp_path, "finetune_refcocog_test.json", REFEXP))
    first, second = records
    assert first.box == (10.0, 20.0, 110.0, 70.5)
    assert (first.width, first.height, first.dataset_name) == (640, 480, "refcocog")
    assert first.extras == {"sentence_id": 3, "original_id": 99}
    assert first.question == "What is the location of the man on the left in the image?"
    assert second.dataset_name is None and second.box == (0.0, 0.0, 320.0, 200.0)


def test_refexp_needs_exactly_one_box_per_expression(tmp_path):
    data = json.loads(json.dumps(REFEXP))
    data["annotations"].append({"id": 3, "image_id": 7, "bbox": [1, 1, 2, 2]})
    with pytest.raises(DataFormatError, match=r"images\[0\] \(id 7\) has 2 annotations"):
        load_refexp(_write(tmp_path, "two.json", data))
    data = json.loads(json.dumps(REFEXP))
    del data["images"][1]["caption"]
    with pytest.raises(DataFormatError, match=r"images\[1\] \(id 8\) lacks caption"):
        load_refexp(_write(tmp_path, "nocap.json", data))
    with pytest.raises(DataFormatError, match="'images' and 'annotations'"):
        load_refexp(_write(tmp_path, "list.json", []))
    data = json.loads(json.dumps(REFEXP))
    data["annotations"][0]["bbox"] = [1, 2, -3, 4]
    with pytest.raises(DataFormatError, match="negative size"):
        load_refexp(_write(tmp_path, "neg.json", data))


def test_flickr_records(tmp_path):
    caption = "A Man in a blue shirt, holds a dog."
    data = {
        "images": [{"id": 1, "file_name": "1000.jpg", "caption": caption, "width": 500, "height": 375,
                    "tokens_positive_eval": [[[0, 5]], [[9, 21]], [[29, 34]]],
                    "original_img_id": 1000, "sentence_id": 0}],
        "annotations": [
            {"image_id": 1, "bbox": [1, 2, 30, 40], "tokens_positive": [[0, 5]]},
            {"image_id": 1, "bbox": [5, 6, 10, 10], "tokens_positive": [[9, 21]]},
            {"image_id": 1, "bbox": [50, 60, 10, 20], "tokens_positive": [[29, 34]]},
            {"image_id": 1, "bbox": [70, 60, 10, 20], "tokens_positive": [[29, 34]]},
        ],
    }
    (record,) = load_flickr(_write(tmp_path, "final_flickr_mergedGT_test.json", data))
    assert record.entities == ("a man", "a blue shirt", "a dog")
    assert record.question == "What are the locations of a man, a blue shirt, a dog?"
    assert record.boxes[0] == (1.0, 2.0, 31.0, 42.0) and len(record.boxes) == 4
    assert record.box_tokens_positive[3] == ((29, 34),)
    assert record.extras == {"original_img_id": 1000, "sentence_id": 0}
    data["images"][0]["tokens_positive_eval"] = [[[30, 99]]]
    with pytest.raises(DataFormatError, match="outside its caption"):
        load_flickr(_write(tmp_path, "badspan.json", data))


def test_malformed_annotation_json_names_position(tmp_path):
    path = tmp_path / "refcoco.json"
    path.write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(DataFormatError, match=r"refcoco\.json at line 1, column 18"):
        load_refexp(str(path))


def test_box_conversion_rejects_malformed_boxes():
    with pytest.raises(ValueError, match=r"\[x, y, w, h\]"):
        xywh_to_xyxy([1, 2, 3])


def test_bad_entries_list_collects_unusable_entries_instead_of_raising(tmp_path):
    data = json.loads(json.dumps(REFEXP))
    data["images"].append({"id": 9, "file_name": "x.jpg", "caption": "no box", "width": 10, "height": 10})
    data["images"].append({"id": 10, "file_name": "y.jpg", "caption": "bad size", "width": "wide", "height": 10})
    data["annotations"].append({"id": 4, "image_id": 10, "bbox": [0, 0, 1, 1]})
    path = _write(tmp_path, "mixed.json", data)
    with pytest.raises(DataFormatError, match=r"images\[2\] \(id 9\) has 0 annotations"):
        load_refexp(path)
    bad = []
    records = load_refexp(path, bad_entries=bad)
    assert [r.image_id for r in records] == [7, 8]
    assert len(bad) == 2 and "has 0 annotations" in bad[0] and "positive integers" in bad[1]
    # A file-level problem is never an entry to skip.
    data["annotations"].append({"bbox": [0, 0, 1, 1]})
    with pytest.raises(DataFormatError, match="annotation 3 needs an 'image_id'"):
        load_refexp(_write(tmp_path, "orphan.json", data), bad_entries=[])


def test_flickr_entity_text_and_boxes_follow_the_spans(tmp_path):
    caption = "Two Men, and a dog."
    data = {
        "images": [{"id": 3, "file_name": "9.jpg", "caption": caption, "width": 50, "height": 40,
                    "tokens_positive_eval": [[[0, 8]], [[13, 18]]]}],
        "annotations": [
            {"image_id": 3, "bbox": [1, 1, 5, 5], "tokens_positive": [[0, 3], [4, 7]]},
            {"image_id": 3, "bbox": [10, 1, 5, 5], "tokens_positive": [[4, 7]]},
            {"image_id": 3, "bbox": [20, 20, 5, 5], "tokens_positive": [[15, 18]]},
            {"image_id": 3, "bbox": [30, 30, 5, 5], "tokens_positive": [[8, 12]]},  # touches neither phrase
        ],
    }
    (record,) = load_flickr(_write(tmp_path, "f.json", data))
    assert record.entities == ("two men", "a dog")
    assert record.entity_text(0) == "Two Men," and record.entity_text(1) == "a dog"
    assert record.entity_boxes(0) == ((1.0, 1.0, 6.0, 6.0), (10.0, 1.0, 15.0, 6.0))
    assert record.entity_boxes(1) == ((20.0, 20.0, 25.0, 25.0),)
    data["annotations"][0]["tokens_positive"] = [[5, 2]]
    with pytest.raises(DataFormatError, match="tokens_positive"):
        load_flickr(_write(tmp_path, "badspan.json", data))
    data["annotations"][0]["tokens_positive"] = [[0, 3]]
    data["images"][0]["tokens_positive_eval"] = [[0, 3]]  # one list level missing
    with pytest.raises(DataFormatError, match="not a list of \\[start, end\\] spans"):
        load_flickr(_write(tmp_path, "flat.json", data))
