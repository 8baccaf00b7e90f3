"""Pictures for the demo: strokes drawn by the user -> regions, and regions/answers drawn on images.

A user refers to a region by drawing a stroke on the image (as in the released demo):

* ``point``: the stroke's median pixel;
* ``box``: the box around the stroke (draw a diagonal, or around the object);
* ``sketch`` (free-form): the stroke's own pixels; the prompt gets their box, the region
  sampler gets the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ferret.regions import Box, FreeForm, GroundedRegion, Point, Region, RegionError

__all__ = ["REFER_MODES", "PALETTE", "stroke_mask", "stroke_to_region", "draw_regions", "draw_grounding"]

REFER_MODES = ("point", "box", "sketch")
# Distinct, readable colours, cycled over regions.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def stroke_mask(layer: Image.Image | np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """Painted pixels of an editor layer as an (H, W) bool array at the image size (W, H)."""
    width, height = size
    if layer is None:
        return np.zeros((height, width), dtype=bool)
    if isinstance(layer, np.ndarray):
        layer = Image.fromarray(layer)
    if layer.mode in ("RGBA", "LA", "PA"):
        alpha = layer.getchannel("A")
    else:
        alpha = layer.convert("L")
    if alpha.size != (width, height):
        alpha = alpha.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(alpha) > 0


def stroke_to_region(mode: str, mask: np.ndarray) -> Region:
    """A drawn stroke ((H, W) bool) -> the region it refers to in ``mode`` (point, box or sketch)."""
    if mode not in REFER_MODES:
        raise RegionError(f"unknown refer mode {mode!r}; choose one of {REFER_MODES}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise RegionError("nothing is drawn: draw on the image to mark a region first")
    ys, xs = np.nonzero(mask)
    if mode == "point":
        return Point(float(np.median(xs).round()), float(np.median(ys).round()))
    if mode == "box":
        x1, x2, y1, y2 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        if x2 - x1 < 2 or y2 - y1 < 2:
            raise RegionError(f"the drawn box [{x1}, {y1}, {x2}, {y2}] is too thin: draw a diagonal or around the object")
        return Box(x1, y1, x2, y2)
    return FreeForm(mask)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, font, image_size) -> None:
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 6, bottom - top + 6
    x = min(max(0, xy[0]), max(0, image_size[0] - w))
    y = xy[1] - h if xy[1] - h >= 0 else xy[1]
    draw.rectangle([x, y, x + w, y + h], fill=colour)
    draw.text((x + 3 - left, y + 3 - top), text, fill=(255, 255, 255), font=font)


def _line_width(image: Image.Image) -> int:
    return max(2, round(min(image.size) / 150))


def draw_regions(
    image: Image.Image, regions: Sequence[Region], labels: Sequence[str] | None = None, first_colour: int = 0
) -> Image.Image:
    """A copy of ``image`` with referred regions outlined (points as dots) and labelled; region i
    gets ``PALETTE[(first_colour + i) % len(PALETTE)]``."""
    out = image.convert("RGB").copy()
    overlay = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(out)
    font = _font(max(12, min(out.size) // 25))
    width = _line_width(out)
    labels = list(labels) if labels is not None else [f"region{i}" for i in range(len(regions))]
    for i, region in enumerate(regions):
        colour = PALETTE[(first_colour + i) % len(PALETTE)]
        if isinstance(region, Point):
            r = max(4, width * 2)
            draw.ellipse([region.x - r, region.y - r, region.x + r, region.y + r], fill=colour, outline=(255, 255, 255))
            _label(draw, (region.x + r, region.y - r), labels[i], colour, font, out.size)
        elif isinstance(region, Box):
            draw.rectangle(list(region.coords), outline=colour, width=width)
            _label(draw, (region.x1, region.y1), labels[i], colour, font, out.size)
        elif isinstance(region, FreeForm):
            overlay.paste((*colour, 110), (0, 0), Image.fromarray(region.mask.astype(np.uint8) * 255, mode="L"))
            x1, y1, x2, y2 = region.bbox
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(1, width // 2))
            _label(draw, (x1, y1), labels[i], colour, font, out.size)
    if any(isinstance(r, FreeForm) for r in regions):
        out = Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")
    return out


def draw_grounding(image: Image.Image, grounded: Sequence[GroundedRegion], first_colour: int = 0) -> Image.Image:
    """A copy of ``image`` with the boxes / points of a model answer drawn, each with its phrase."""
    regions, labels = [], []
    for item in grounded:
        if item.box is not None:
            x1, y1, x2, y2 = item.box
            if x2 <= x1 or y2 <= y1:  # a degenerate answer box: show it as a point
                regions.append(Point(x1, y1))
            else:
                regions.append(Box(x1, y1, x2, y2))
        else:
            regions.append(Point(*item.point))
        labels.append(item.phrase or "")
    return draw_regions(image, regions, labels, first_colour)
