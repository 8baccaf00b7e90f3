"""COCO run-length encoding of binary masks (through pycocotools), json-friendly.

Masks in our json files are COCO RLE dicts `{"size": [H, W], "counts": "<ascii>"}` exactly as
in the released GRIT data; decoded masks are numpy bool arrays in image layout (H, W).
"""

from __future__ import annotations

from typing import Any, Mapping

import warnings

import numpy as np
from pycocotools import mask as coco_mask

from ferret.data.errors import SampleError


def encode_rle(mask_hw: np.ndarray) -> dict:
    """Encode an (H, W) boolean mask as a json-serialisable COCO RLE dict."""
    if mask_hw.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask_hw.shape}")
    encoded = coco_mask.encode(np.asfortranarray(mask_hw.astype(np.uint8)))
    return {"size": [int(encoded["size"][0]), int(encoded["size"][1])],
            "counts": encoded["counts"].decode("ascii")}


def rle_size(rle: Any) -> tuple[int, int]:
    """(H, W) recorded in an RLE dict; a malformed dict raises SampleError('bad_mask')."""
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise SampleError("bad_mask", f"mask is not a COCO RLE dict with size and counts: {rle!r:.80}")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise SampleError("bad_mask", f"RLE size must be [H, W] integers, got {size!r}")
    return int(size[0]), int(size[1])


def decode_rle(rle: Mapping, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a COCO RLE dict to an (H, W) bool array, checking its size against the image."""
    height, width = rle_size(rle)
    if expected_hw is not None and (height, width) != tuple(expected_hw):
        raise SampleError(
            "mask_size_mismatch",
            f"RLE size {[height, width]} differs from image size (h, w) {list(expected_hw)}",
        )
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        encoded = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    elif isinstance(counts, str):
        if not counts:  # pycocotools decodes "" to uninitialised pixels instead of failing
            raise SampleError("bad_mask", "RLE counts string is empty")
        encoded = {"size": [height, width], "counts": counts.encode("ascii")}
    elif isinstance(counts, bytes):
        encoded = {"size": [height, width], "counts": counts}
    else:
        raise SampleError("bad_mask", f"RLE counts must be a string or a list, got {type(counts).__name__}")
    try:
        with warnings.catch_warnings():  # pycocotools trips numpy 2's __array__(copy=) notice
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = coco_mask.decode(encoded)
    except Exception as err:  # pycocotools raises bare errors on corrupt counts
        raise SampleError("bad_mask", f"cannot decode RLE counts: {err}") from err
    if decoded.shape != (height, width):
        raise SampleError("bad_mask", f"RLE decodes to {decoded.shape}, header says {(height, width)}")
    return decoded.astype(bool)
