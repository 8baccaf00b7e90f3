"""Demo drawing logic: strokes -> regions, regions/answers drawn on images, web-server helpers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ferret.regions import Box, FreeForm, GroundedRegion, Point, RegionError
from ferret.serve.drawing import PALETTE, draw_grounding, draw_regions, stroke_mask, stroke_to_region
from ferret.serve.gradio_web_server import (
    DemoError,
    answer_picture,
    display_question,
    mark_stroke,
    new_session,
    split_editor,
    sync_image,
)
from ferret.serve.protocol import region_from_json


def stroke(height=60, width=80, box=(10, 20, 30, 40)):
    """A diagonal stroke (3 px thick) from (x1, y1) to (x2, y2) on an (H, W) canvas."""
    mask = np.zeros((height, width), dtype=bool)
    x1, y1, x2, y2 = box
    for t in np.linspace(0, 1, 200):
        x, y = round(x1 + (x2 - x1) * t), round(y1 + (y2 - y1) * t)
        mask[max(y - 1, y1) : min(y + 2, y2 + 1), max(x - 1, x1) : min(x + 2, x2 + 1)] = True
    return mask


def test_box_mode_takes_the_box_around_the_stroke():
    assert stroke_to_region("box", stroke()) == Box(10, 20, 30, 40)


def test_point_mode_takes_the_stroke_median():
    mask = np.zeros((60, 80), dtype=bool)
    mask[30:33, 40:43] = True
    assert stroke_to_region("point", mask) == Point(41, 31)


def test_sketch_mode_keeps_the_stroke_pixels():
    mask = stroke()
    region = stroke_to_region("sketch", mask)
    assert isinstance(region, FreeForm) and np.array_equal(region.mask, mask)
    assert region.bbox == (10, 20, 30, 40)


@pytest.mark.parametrize(
    "mode, mask, fragment",
    [
        ("box", np.zeros((5, 5), dtype=bool), "nothing is drawn"),
        ("box", np.eye(5, dtype=bool)[:, :1].repeat(5, axis=1).T, "too thin"),
        ("lasso", np.ones((5, 5), dtype=bool), "unknown refer mode"),
    ],
)
def test_unusable_strokes_are_refused(mode, mask, fragment):
    with pytest.raises(RegionError, match=fragment):
        stroke_to_region(mode, mask)


def test_stroke_mask_reads_alpha_and_resizes():
    layer = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (4, 6, 10, 12))
    mask = stroke_mask(layer, (80, 60))  # the layer was drawn on a half-size canvas
    ys, xs = np.nonzero(mask)
    assert mask.shape == (60, 80)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 19, 12, 23)
    assert not stroke_mask(None, (8, 6)).any()


def test_draw_regions_outlines_boxes_in_palette_colours():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    out = draw_regions(image, [Box(10, 10, 60, 50), Point(80, 60)], labels=["", ""])
    assert out.getpixel((10, 30)) == PALETTE[0]  # left edge of the box
    assert out.getpixel((35, 30)) == (255, 255, 255)  # inside stays untouched
    assert out.getpixel((80, 60)) == PALETTE[1]  # the point's dot
    assert image.getpixel((10, 30)) == (255, 255, 255)  # the input is not modified


def test_draw_grounding_draws_answer_boxes_with_phrases():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    grounded = [GroundedRegion("a red circle", (20.0, 20.0, 70.0, 60.0), None, (200, 250, 700, 750), (0, 1))]
    out = draw_grounding(image, grounded, first_colour=2)
    assert out.getpixel((45, 60)) == PALETTE[2]  # bottom edge
    label_pixels = np.all(np.asarray(out)[:20] == PALETTE[2], axis=-1).sum()
    assert label_pixels > 50  # the phrase label's background above the box


def test_answer_picture_shows_referred_region_and_answer_boxes():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    picture = answer_picture(image, [{"type": "box", "box": [5, 5, 40, 40]}], "A dog [600, 500, 900, 875].")
    assert picture.getpixel((5, 20)) == PALETTE[0]
    assert picture.getpixel((60, 55)) == PALETTE[1]  # answer box left edge at x = 600 * 100 / 1000


def test_display_question_names_regions():
    regions = [Box(0, 0, 49, 49), Point(10, 10)]
    assert display_question("Is <region> near <region>?", regions, 100, 100) == \
        "Is region0 [0, 0, 490, 490] near region1 [100, 100]?"
    assert display_question("What is this?", regions[:1], 100, 100) == "What is this? region0 [0, 0, 490, 490]"


def test_mark_stroke_from_an_editor_value():
    background = Image.new("RGBA", (80, 60), (10, 200, 10, 255))
    layer = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (10, 20, 31, 41))
    value = {"background": background, "layers": [layer], "composite": background}
    image, painted = split_editor(value)
    assert image.mode == "RGB" and painted.sum() == 21 * 21
    session = mark_stroke(new_session(), value, "Box")
    assert session["regions"] == [{"type": "box", "box": [10, 20, 30, 40]}]
    session = mark_stroke(session, value, "Point")
    assert session["regions"][1] == {"type": "point", "point": [20.0, 30.0]}
    session = mark_stroke(session, value, "Sketch")
    sketch = region_from_json(session["regions"][2], 80, 60)
    assert isinstance(sketch, FreeForm) and sketch.mask.sum() == 21 * 21 and sketch.bbox == (10, 20, 30, 40)
    with pytest.raises(DemoError, match="nothing is drawn"):
        mark_stroke(session, {"background": background, "layers": [], "composite": background}, "Box")
    with pytest.raises(DemoError, match="upload an image"):
        mark_stroke(session, None, "Box")


def test_a_new_image_starts_a_new_conversation():
    first = Image.new("RGB", (8, 8), (1, 1, 1))
    session = sync_image(new_session(), first)
    session["turns"].append({"question": "q", "answer": "a"})
    assert sync_image(session, first.copy())["turns"]  # same pixels: same conversation
    assert sync_image(session, Image.new("RGB", (8, 8), (2, 2, 2)))["turns"] == []
