"""Tests of ferret.regions: region types, grid conversion, formatting, parsing, masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ferret.constants import REGION_TOKEN
from ferret.regions import (
    Box,
    FreeForm,
    GroundedRegion,
    Point,
    RegionError,
    clip_box,
    format_region,
    grid_to_box,
    grid_to_pixel,
    grid_to_point,
    parse_grounding,
    pixel_to_grid,
    region_mask,
    region_to_grid,
)

sizes = st.integers(min_value=1, max_value=5000)


# ---------------------------------------------------------------------------------------------
# Region types


def test_region_types_validate_coordinates():
    assert Point(3, 4.5) == Point(3, 4.5)
    assert Box(1, 2, 3, 4).coords == (1, 2, 3, 4)
    with pytest.raises(RegionError, match="NaN"):
        Point(float("nan"), 1)
    with pytest.raises(RegionError, match="infinite"):
        Box(0, 0, float("inf"), 3)
    with pytest.raises(RegionError, match=r"box \[5, 5, 5, 9\] is degenerate \(zero width\)"):
        Box(5, 5, 5, 9)
    with pytest.raises(RegionError, match="zero height"):
        Box(1, 7, 9, 7)
    with pytest.raises(RegionError, match="x2 < x1"):
        Box(9, 1, 2, 5)
    with pytest.raises(RegionError, match="numbers"):
        Point("3", 4)
    assert issubclass(RegionError, ValueError)


def test_free_form_mask_and_bbox():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10] = True
    mask[7, 12:15] = True
    region = FreeForm(mask)
    assert region.bbox == (10, 5, 14, 8)
    assert not region.mask.flags.writeable
    mask[0, 0] = True  # the region keeps its own copy
    assert not region.mask[0, 0]
    assert FreeForm(np.where(mask, 1.0, 0.0)).mask.dtype == np.bool_
    with pytest.raises(RegionError, match="empty"):
        FreeForm(np.zeros((4, 4), bool))
    with pytest.raises(RegionError, match="2-D"):
        FreeForm(np.ones((2, 2, 2), bool))
    with pytest.raises(RegionError, match="NaN"):
        FreeForm(np.array([[1.0, np.nan]]))


# ---------------------------------------------------------------------------------------------
# Grid conversion


def test_pixel_to_grid_matches_released_truncation():
    # int(pixel * 1000 / side), as the released training data and demo write coordinates
    assert pixel_to_grid(0, 640) == 0
    assert pixel_to_grid(639, 640) == int(639 * 1000 / 640) == 998
    assert pixel_to_grid(123, 457) == int(123 * 1000 / 457)
    assert pixel_to_grid(2000, 640) == 999  # clamped
    assert pixel_to_grid(-3, 640) == 0
    for side in (7, 333, 480, 1333):
        for px in range(side):
            assert pixel_to_grid(px, side) == min(int(px * 1000 / side), 999)


def test_grid_to_pixel_and_released_int_boxes():
    assert grid_to_pixel(500, 640) == 320.0
    assert grid_to_box([102, 33, 640, 720], 500, 400) == (51.0, 13.2, 320.0, 288.0)
    # released resize_bbox: int(g * W / 1000)
    assert grid_to_box([102, 33, 640, 720], 500, 400, as_int=True) == (51, 13, 320, 288)
    assert grid_to_point([500, 400], 333, 211, as_int=True) == (int(500 * 333 / 1000), int(400 * 211 / 1000))
    with pytest.raises(RegionError, match="needs 4 grid coordinates, got 3"):
        grid_to_box([1, 2, 3], 10, 10)
    with pytest.raises(RegionError, match="needs 2 grid coordinates"):
        grid_to_point([1, 2, 3], 10, 10)
    with pytest.raises(RegionError, match="NaN"):
        grid_to_point([1, float("nan")], 10, 10)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_image_sizes(bad):
    with pytest.raises(RegionError):
        pixel_to_grid(1, bad)
    with pytest.raises(RegionError):
        region_to_grid(Point(0, 0), bad, 10)
    with pytest.raises(RegionError):
        region_mask(Box(0, 0, 3, 3), 10, bad)


@settings(max_examples=300, deadline=None)
@given(size=sizes, frac=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_pixel_grid_pixel_within_one_cell(size, frac):
    px = frac * size
    back = grid_to_pixel(pixel_to_grid(px, size), size)
    assert back <= px + 1e-9
    assert px - back < size / 1000 + 1e-9


@settings(max_examples=300, deadline=None)
@given(size=sizes, g=st.integers(min_value=0, max_value=999))
def test_grid_pixel_grid_identity(size, g):
    assert pixel_to_grid(grid_to_pixel(g, size), size) == g


# ---------------------------------------------------------------------------------------------
# Region -> grid and prompt text


def test_region_to_grid_and_format():
    assert region_to_grid(Point(320, 240), 640, 480) == [500, 500]
    assert format_region(Point(320, 240), 640, 480) == f"[500, 500] {REGION_TOKEN}"
    assert format_region(Box(64, 48, 320, 240), 640, 480) == f"[100, 100, 500, 500] {REGION_TOKEN}"
    assert format_region(Box(64, 48, 320, 240), 640, 480, with_token=False) == "[100, 100, 500, 500]"
    # boxes reaching past the image are clamped to [0, side-1] first (released regulate_box)
    assert region_to_grid(Box(-20, -5, 1000, 900), 640, 480) == [0, 0, 998, 997]
    mask = np.zeros((480, 640), bool)
    mask[100:200, 50] = True  # a one-pixel-wide scribble is fine for a free-form region
    assert format_region(FreeForm(mask), 640, 480) == (
        f"[{int(50 * 1000 / 640)}, {int(100 * 1000 / 480)}, {int(50 * 1000 / 640)}, {int(199 * 1000 / 480)}] {REGION_TOKEN}"
    )


def test_region_to_grid_errors():
    with pytest.raises(RegionError, match="outside"):
        region_to_grid(Point(640, 10), 640, 480)
    with pytest.raises(RegionError, match="outside"):
        region_to_grid(Point(-1, 10), 640, 480)
    with pytest.raises(RegionError, match="wholly outside"):
        region_to_grid(Box(700, 10, 800, 20), 640, 480)
    with pytest.raises(RegionError, match="degenerate"):
        region_to_grid(Box(-30, 10, 0, 20), 640, 480)  # clipped to zero width
    with pytest.raises(RegionError, match=r"shape \(10, 10\)"):
        region_to_grid(FreeForm(np.ones((10, 10), bool)), 640, 480)
    with pytest.raises(RegionError, match="expected a Point, Box or FreeForm"):
        region_to_grid((1, 2), 640, 480)


def test_clip_box():
    assert clip_box(Box(-5, 2, 50, 8), 20, 10).coords == (0, 2, 19, 8)


# ---------------------------------------------------------------------------------------------
# Parsing model text


def test_parse_basic_box_and_phrase():
    text = "The dog [102, 33, 640, 720] is on the grass."
    (r,) = parse_grounding(text, 500, 400)
    assert isinstance(r, GroundedRegion)
    assert r.phrase == "The dog"
    assert r.grid == (102, 33, 640, 720)
    assert r.box == pytest.approx((51.0, 13.2, 320.0, 288.0))
    assert r.point is None
    assert text[r.span[0] : r.span[1]] == "[102, 33, 640, 720]"


def test_parse_multiple_boxes_sentences_and_points():
    text = (
        "There are two dogs [10, 20, 30, 40], [50, 60, 70, 80] on the grass. "
        "A cat [100, 100, 200, 200] and a ball [300, 300] <region_fea>."
    )
    regions = parse_grounding(text, 1000, 1000)
    assert [r.phrase for r in regions] == ["There are two dogs", "There are two dogs", "A cat", "a ball"]
    assert [r.grid for r in regions] == [(10, 20, 30, 40), (50, 60, 70, 80), (100, 100, 200, 200), (300, 300)]
    assert regions[3].point == (300.0, 300.0) and regions[3].box is None


@pytest.mark.parametrize(
    "text, grid",
    [
        ("a dog [ 102,33 ,640,  720 ] x", (102, 33, 640, 720)),  # odd spacing
        ("a dog [[102, 33, 640, 720]] x", (102, 33, 640, 720)),  # doubled brackets
        ("a dog 102, 33, 640, 720] x", (102, 33, 640, 720)),  # missing opening bracket
        ("a dog [102, 33, 640, 720 x", (102, 33, 640, 720)),  # missing closing bracket
        ("a dog 102, 33, 640, 720 x", (102, 33, 640, 720)),  # no brackets, four numbers
        ("a dog [640, 720, 102, 33]", (102, 33, 640, 720)),  # swapped corners
        ("a dog [102, -4, 1640, 720]", (102, 0, 999, 720)),  # out of range: clamped
        ("a dog [102.7, 33.2, 640.9, 720.5]", (102, 33, 640, 720)),  # decimals truncate
        ("a dog [102 33 640 720]", (102, 33, 640, 720)),  # blank-separated inside brackets
        ("a dog [102, 33, 640, 720]</s>garbage{{", (102, 33, 640, 720)),
    ],
)
def test_parse_tolerates_messy_text(text, grid):
    (r,) = parse_grounding(text, 1000, 1000)
    assert r.grid == grid
    assert r.phrase == "a dog"


@pytest.mark.parametrize(
    "text",
    ["", "no coordinates here", "2 dogs and 3 cats", "version 1, 2", "x1, y1, x2, y2", "[1, 2, 3]", "[", "]]]", "[,,,]"],
)
def test_parse_returns_empty_when_nothing_parses(text):
    assert parse_grounding(text, 640, 480) == []


def test_parse_glued_boxes_and_skips_bad_groups():
    regions = parse_grounding("cars [1, 2, 3, 4, 5, 6, 7, 8] and junk [1, 2, 3] end", 1000, 1000)
    assert [r.grid for r in regions] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert parse_grounding(None, 10, 10) == []  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[], 0123456789.-abc <region_fea>\n")), max_size=80))
def test_parse_never_raises(text):
    for r in parse_grounding(text, 37, 91):
        assert len(r.grid) in (2, 4)
        assert all(0 <= g <= 999 for g in r.grid)
        coords = r.box if r.box is not None else r.point
        assert all(0 <= c < 91 for c in coords)


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(2, 3000),
    height=st.integers(2, 3000),
    data=st.data(),
)
def test_format_then_parse_round_trip(width, height, data):
    x1 = data.draw(st.integers(0, width - 2))
    x2 = data.draw(st.integers(x1 + 1, width - 1))
    y1 = data.draw(st.integers(0, height - 2))
    y2 = data.draw(st.integers(y1 + 1, height - 1))
    px = data.draw(st.floats(0, width, exclude_max=True))
    py = data.draw(st.floats(0, height, exclude_max=True))
    box, point = Box(x1, y1, x2, y2), Point(px, py)
    text = f"Look at {format_region(box, width, height)} and {format_region(point, width, height)}."
    parsed = parse_grounding(text, width, height)
    assert [r.grid for r in parsed] == [
        tuple(region_to_grid(box, width, height)),
        tuple(region_to_grid(point, width, height)),
    ]
    assert parsed[0].phrase == "Look at"


# ---------------------------------------------------------------------------------------------
# Region masks


def test_point_mask_is_clipped_11x11_window():
    mask = region_mask(Point(20, 30), 64, 48)
    assert mask.dtype == torch.bool and mask.shape == (64, 48)
    assert mask.sum() == 121
    xs, ys = mask.nonzero(as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (15, 25, 25, 35)
    corner = region_mask(Point(1, 2), 64, 48)  # clipped at the top-left corner
    assert corner.sum() == 7 * 8
    # released: coordinates are floats, window is [int(max(0, x-5)), int(min(W, x+6)))
    frac = region_mask(Point(10.7, 10.2), 64, 48)
    xs, ys = frac.nonzero(as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 15, 5, 15)


def test_point_mask_intersects_segment_or_box():
    seg = np.zeros((48, 64), bool)  # (H, W)
    seg[28:40, 18:22] = True  # rows y 28..39, columns x 18..21
    mask = region_mask(Point(20, 30), 64, 48, segment=seg)
    xs, ys = mask.nonzero(as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (18, 21, 28, 35)
    boxed = region_mask(Point(20, 30), 64, 48, box=Box(19, 29, 40, 40))
    assert boxed.sum() == 7 * 7  # x 19..25, y 29..35
    far = np.zeros((48, 64), bool)
    far[0:2, 60:62] = True
    assert region_mask(Point(20, 30), 64, 48, segment=far).sum() == 121  # off the object: window


def test_box_mask_inclusive_and_segment_fallback():
    mask = region_mask(Box(2, 3, 5, 9), 10, 12)
    assert mask.shape == (10, 12) and mask.sum() == 4 * 7
    assert mask[2, 3] and mask[5, 9] and not mask[6, 9] and not mask[5, 10]
    seg = np.zeros((12, 10), bool)
    seg[3:5, 2:4] = True
    assert region_mask(Box(2, 3, 5, 9), 10, 12, segment=seg).sum() == 4
    disjoint = np.zeros((12, 10), bool)
    disjoint[11, 9] = True
    assert torch.equal(region_mask(Box(2, 3, 5, 9), 10, 12, segment=disjoint), mask)  # fallback
    assert region_mask(Box(-4, -4, 3.9, 2.5), 10, 12).sum() == 4 * 3  # clipped, floats truncate
    seg_t = torch.from_numpy(seg)
    assert torch.equal(region_mask(Box(2, 3, 5, 9), 10, 12, segment=seg_t), region_mask(Box(2, 3, 5, 9), 10, 12, segment=seg))


def test_free_form_mask_layout():
    hw = np.zeros((12, 10), bool)
    hw[3, 7] = hw[4, 8] = True  # (y, x)
    mask = region_mask(FreeForm(hw), 10, 12)
    assert mask.shape == (10, 12)
    assert mask[7, 3] and mask[8, 4] and mask.sum() == 2
    assert torch.equal(mask, torch.from_numpy(hw).T)


def test_mask_errors():
    with pytest.raises(RegionError, match="wholly outside"):
        region_mask(Box(20, 20, 30, 30), 10, 12)
    with pytest.raises(RegionError, match="outside"):
        region_mask(Point(10, 0), 10, 12)
    with pytest.raises(RegionError, match=r"segment mask has shape \(10, 12\)"):
        region_mask(Box(1, 1, 4, 4), 10, 12, segment=np.ones((10, 12), bool))
    with pytest.raises(RegionError, match="free-form mask has shape"):
        region_mask(FreeForm(np.ones((5, 5), bool)), 10, 12)
    with pytest.raises(RegionError, match="degenerate"):
        region_mask(Box(-5, 1, 0, 4), 10, 12)


def test_format_region_then_mask_consistent_with_grid():
    # the mask of a formatted box covers the pixels that the grid box maps back to
    box = Box(64, 48, 320, 240)
    x1, y1, x2, y2 = grid_to_box(region_to_grid(box, 640, 480), 640, 480)
    mask = region_mask(box, 640, 480)
    assert mask[math.floor(x1), math.floor(y1)] and mask[math.floor(x2), math.floor(y2)]


@pytest.mark.parametrize("text", ["[" * 5000, "1 " * 5000, "1, " * 5000, "[1 , " * 3000, " " * 5000 + "1"])
def test_parse_is_linear_on_pathological_text(text):
    import time

    start = time.perf_counter()
    assert parse_grounding(text, 100, 100) == []
    assert time.perf_counter() - start < 1.0
