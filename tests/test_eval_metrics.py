"""Metric functions against hand-computed cases."""

import numpy as np
import pytest

from ferret.eval import metrics as M


def test_box_conversions_round_trip():
    from ferret.data.formats import xywh_to_xyxy

    assert list(xywh_to_xyxy([10, 20, 30, 40])) == [10, 20, 40, 60]
    assert M.xyxy_to_xywh(xywh_to_xyxy([10, 20, 30, 40])) == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="four"):
        M.xyxy_to_xywh([1, 2, 3])
    with pytest.raises(ValueError, match=r"\[x, y, w, h\]"):
        xywh_to_xyxy(["a", 2, 3, 4])


def test_box_iou_hand_computed():
    # Overlap 5x5 = 25, areas 100 and 100 -> 25 / 175.
    assert M.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert M.box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0  # touching corners
    assert M.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union, no NaN
    # Contained box: 4x4 inside 10x10 -> 16 / 100.
    assert M.box_iou([0, 0, 10, 10], [2, 2, 6, 6]) == pytest.approx(0.16)


def test_box_iou_matrix_shape_and_values():
    iou = M.box_iou_matrix([[0, 0, 10, 10], [0, 0, 20, 20]], [[0, 0, 10, 10], [0, 0, 5, 5], [50, 50, 60, 60]])
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou, [[1.0, 0.25, 0.0], [0.25, 25 / 400, 0.0]])


def test_clip_and_merge_boxes():
    assert M.clip_box([-5, 3, 120, 90], 100, 80) == [0, 3, 100, 80]
    assert M.merge_boxes([[10, 20, 30, 40], [5, 25, 35, 30]]) == [5, 20, 35, 40]
    assert M.merge_boxes([[1, 2, 3, 4]]) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        M.merge_boxes([])


def test_hit_and_recall_at_k():
    target = [[0, 0, 10, 10]]
    preds = [[100, 100, 110, 110], [0, 0, 10, 9]]  # second one has IoU 0.9
    assert not M.hit_at_k(preds, target, k=1)
    assert M.hit_at_k(preds, target, k=5)
    assert M.hit_at_k(preds, target, k=None)
    assert not M.hit_at_k([], target, k=1)
    # IoU exactly 0.5 counts (>=): [0,0,10,10] vs [0,0,10,5] -> 50/100.
    assert M.hit_at_k([[0, 0, 10, 5]], target, k=1)
    # any-box protocol: a hit on either target box counts.
    assert M.hit_at_k([[20, 20, 30, 30]], [[0, 0, 10, 10], [20, 20, 30, 30]], k=1)
    per_query = [preds, [[0, 0, 10, 10]], []]
    assert M.recall([M.hit_at_k(p, target, k=1) for p in per_query]) == pytest.approx(1 / 3)
    assert M.recall([M.hit_at_k(p, target, k=10) for p in per_query]) == pytest.approx(2 / 3)
    assert M.recall([]) == 0.0


def test_decode_grounded_boxes_phrases_and_pixels():
    text = "A man [100, 200, 300, 400], a dog [0, 0, 500, 500] [500, 500, 999, 999]. Sky [1, 2]."
    boxes = M.decode_grounded_boxes(text, width=200, height=100)
    assert [b.phrase for b in boxes] == ["A man", "a dog", "a dog"]
    assert boxes[0].box == (20, 20, 60, 40)
    assert boxes[2].grid_box == (500, 500, 999, 999)
    assert boxes[2].box == (100, 50, 199, 99)
    assert M.decode_grounded_boxes("no boxes here [x, y, z, w]", 10, 10) == []
    # Pixel boxes truncate like the released scorers: 999 * 480 / 1000 = 479.52 -> 479,
    # 333 * 640 / 1000 = 213.12 -> 213.
    assert M.decode_grounded_boxes("it [500, 0, 999, 999]", 640, 480)[0].box == (320, 0, 639, 479)
    assert M.decode_grounded_boxes("it [333, 250, 334, 251]", 640, 480)[0].box == (213, 120, 213, 120)


def test_phrase_match():
    assert M.phrases_match("A young  man.", "a young man")
    assert not M.phrases_match("a man", "a woman")


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is not a dog. Yes.", "no"),
    ("yes", "yes"),
    ("Nothing like that", "yes"),  # released rule is word-based: "Nothing" is not "No"
    ("", None),
    ("   ", None),
])
def test_parse_yes_no(text, expected):
    assert M.parse_yes_no(text) == expected


def test_binary_classification_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", None, "yes"]
    labels = ["yes", "no", "no", "yes", "yes", "yes"]
    m = M.binary_classification_metrics(preds, labels)
    # tp=2 (0,5), fp=1 (1), tn=1 (2), fn=2 (3, and None on a yes label)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    # None on a "no" label is also wrong.
    assert M.binary_classification_metrics([None], ["no"])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        M.binary_classification_metrics(["yes"], ["maybe"])


def test_lvis_answer_rules():
    assert M.lvis_class_names("teddy_bear", ["teddy", "bow_(weapon)"]) == ["teddy bear", "teddy", "bow", "weapon"]
    assert M.lvis_answer_correct("It is a teddy bear.", "teddy_bear", [])
    assert M.lvis_answer_correct("The object is a cat, not a dog.", "cat", [])
    assert not M.lvis_answer_correct("The object is a dog, not a cat.", "cat", [])
    assert M.lvis_answer_correct("a bow.", "archery_bow", ["bow_(weapon)"])
    # released rule credits echoing both classes; the strict rule does not
    assert M.lvis_answer_correct("a cat or a dog", "cat", [])
    assert not M.lvis_answer_correct_strict("a cat or a dog", "cat", [], "dog")
    assert M.lvis_answer_correct_strict("a cat, not a dog.", "cat", [], "dog")
