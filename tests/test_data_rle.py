"""COCO RLE helpers."""

import numpy as np
import pytest

from ferret.data.errors import SampleError
from ferret.data.rle import decode_rle, encode_rle


def test_round_trip_keeps_layout():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    mask[4, 0] = True
    rle = encode_rle(mask)
    assert rle["size"] == [5, 7] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle, (5, 7)), mask)


def test_uncompressed_counts_are_accepted():
    # Column-major runs: 2 zeros, 3 ones, 1 zero over a 3x2 image.
    mask = decode_rle({"size": [3, 2], "counts": [2, 3, 1]})
    assert mask.T.flatten().tolist() == [False, False, True, True, True, False]


@pytest.mark.parametrize("rle, reason", [
    ({"size": [3, 4], "counts": "!!!!"}, "bad_mask"),
    ({"size": [3, 4], "counts": ""}, "bad_mask"),
    ({"size": [3, 4], "counts": 5}, "bad_mask"),
    ({"size": [3], "counts": "0<"}, "bad_mask"),
    ([1, 2, 3], "bad_mask"),
])
def test_bad_rle_raises_sample_error(rle, reason):
    with pytest.raises(SampleError) as info:
        decode_rle(rle)
    assert info.value.reason == reason


def test_wrong_size_is_named():
    rle = encode_rle(np.ones((4, 6), bool))
    with pytest.raises(SampleError, match=r"RLE size \[4, 6\] differs from image size \(h, w\) \[6, 4\]") as info:
        decode_rle(rle, (6, 4))
    assert info.value.reason == "mask_size_mismatch"
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.ones((2, 2, 2), bool))
