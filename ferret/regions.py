"""Regions (point, box, free-form), the 0-999 coordinate grid, prompt formatting, grounding
parsing and region masks.

Conventions (taken from the released Ferret code):

* Region coordinates are pixel coordinates of the raw image. Integer values index pixels; a box's
  ``x2``/``y2`` is the last pixel it covers (inclusive), as in the released data and demo, whose
  masks are ``mask[x1:x2 + 1, y1:y2 + 1]``.
* Pixel -> grid (as the released training data and demo write regions):
  ``int(pixel * 1000 / side)``, truncation. Boxes are first clamped into ``[0, side - 1]`` (released ``regulate_box``).
  We add a 1e-7 tolerance before truncating so that float round-off never drops a value one cell
  (``grid_to_pixel`` followed by ``pixel_to_grid`` is then the identity); for integer pixels of
  any image under ten million pixels a side this gives exactly the released numbers.
* Grid -> pixel (as the released evaluation and demo read boxes back): ``g * side / 1000``;
  the released evaluation then truncates with ``int()``. ``grid_to_pixel`` returns the exact
  float; ``grid_to_box(..., as_int=True)`` reproduces the released truncation.
* Masks use the official layout: a bool tensor shaped ``(W, H)``, indexed ``[x, y]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from ferret.constants import GRID_SIZE, REGION_TOKEN

__all__ = [
    "RegionError",
    "Point",
    "Box",
    "FreeForm",
    "Mask",
    "Region",
    "GroundedRegion",
    "POINT_SPAN",
    "pixel_to_grid",
    "grid_to_pixel",
    "region_to_grid",
    "grid_to_box",
    "grid_to_point",
    "clip_box",
    "format_coordinates",
    "format_region",
    "parse_grounding",
    "region_mask",
]

# Half-width of the square window a point refers to (released code: span 5 -> 11x11 pixels).
POINT_SPAN = 5
# Tolerance (in grid cells) added before truncation; see the module docstring.
_GRID_EPS = 1e-7


class RegionError(ValueError):
    """A region, its coordinates or the image size it is used with is invalid."""


def _fmt(v: float) -> str:
    """Short number for messages: 5 not 5.0."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _check_finite(kind: str, values: Sequence[float]) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise RegionError(f"{kind} coordinates must be numbers, got {values!r}")
        if not math.isfinite(v):
            what = "NaN" if math.isnan(v) else "infinite"
            raise RegionError(f"{kind} {list(values)!r} has a {what} coordinate")


def _check_image_size(width: int, height: int) -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise RegionError(f"image {name} must be an integer, got {v!r}")
        if v <= 0:
            raise RegionError(f"image size must be positive, got width={width}, height={height}")
    return int(width), int(height)


@dataclass(frozen=True)
class Point:
    """A point in pixel coordinates."""

    x: float
    y: float

    def __post_init__(self) -> None:
        _check_finite("point", (self.x, self.y))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates; (x2, y2) is the last covered pixel."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        coords = (self.x1, self.y1, self.x2, self.y2)
        _check_finite("box", coords)
        text = "[" + ", ".join(_fmt(v) for v in coords) + "]"
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise RegionError(f"box {text} is malformed: x2 < x1 or y2 < y1 (expected [x1, y1, x2, y2])")
        if self.x2 == self.x1:
            raise RegionError(f"box {text} is degenerate (zero width)")
        if self.y2 == self.y1:
            raise RegionError(f"box {text} is degenerate (zero height)")

    @property
    def coords(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True, eq=False)
class FreeForm:
    """A free-form region (scribble or segment): a bool array shaped (H, W), row-major image layout."""

    mask: np.ndarray

    def __post_init__(self) -> None:
        mask = self.mask
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise RegionError(f"free-form mask must be 2-D (H, W), got shape {tuple(mask.shape)}")
        if mask.dtype != np.bool_:
            if not (np.issubdtype(mask.dtype, np.number)):
                raise RegionError(f"free-form mask must be boolean or numeric, got dtype {mask.dtype}")
            if not np.isfinite(mask).all():
                raise RegionError("free-form mask contains NaN or infinite values")
            mask = mask != 0
        if not mask.any():
            raise RegionError(f"free-form region is empty (no pixel set in its {mask.shape[0]}x{mask.shape[1]} mask)")
        mask = mask.copy()
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x1, y1, x2, y2) around the set pixels (may be one pixel wide)."""
        ys = np.flatnonzero(self.mask.any(axis=1))
        xs = np.flatnonzero(self.mask.any(axis=0))
        return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


Mask = FreeForm
Region = Union[Point, Box, FreeForm]


@dataclass(frozen=True)
class GroundedRegion:
    """A coordinate group parsed from model text.

    ``box`` (x1, y1, x2, y2) or ``point`` (x, y) is in pixels of the image given to the parser
    (exactly one of them is set); ``grid`` holds the clamped, ordered 0-999 numbers; ``span`` is
    the (start, end) character range of the group in the text; ``phrase`` is the text the group
    refers to.
    """

    phrase: str
    box: tuple[float, float, float, float] | None
    point: tuple[float, float] | None
    grid: tuple[int, ...]
    span: tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Grid conversion


def pixel_to_grid(v: float, size: int) -> int:
    """Pixel coordinate -> 0..GRID_SIZE-1 grid value: ``int(v * 1000 / size)``, clamped."""
    _check_finite("pixel", (v,))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise RegionError(f"image side must be a positive integer, got {size!r}")
    g = math.floor(float(v) * GRID_SIZE / int(size) + _GRID_EPS)
    return min(max(g, 0), GRID_SIZE - 1)


def grid_to_pixel(g: float, size: int) -> float:
    """Grid value -> pixel coordinate ``g * size / 1000`` (exact float; ``g`` clamped to 0..999)."""
    _check_finite("grid", (g,))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise RegionError(f"image side must be a positive integer, got {size!r}")
    g = min(max(float(g), 0.0), GRID_SIZE - 1.0)
    return g * int(size) / GRID_SIZE


def clip_box(box: Box, width: int, height: int) -> Box:
    """Clamp a box into the image's pixel range [0, W-1] x [0, H-1] (released ``regulate_box``).

    Raises RegionError when the box lies wholly outside the image or is degenerate once clipped.
    """
    width, height = _check_image_size(width, height)
    text = "[" + ", ".join(_fmt(v) for v in box.coords) + "]"
    if box.x2 < 0 or box.y2 < 0 or box.x1 > width - 1 or box.y1 > height - 1:
        raise RegionError(f"box {text} lies wholly outside the {width}x{height} image")
    x1, x2 = min(max(box.x1, 0), width - 1), min(max(box.x2, 0), width - 1)
    y1, y2 = min(max(box.y1, 0), height - 1), min(max(box.y2, 0), height - 1)
    if x1 == x2:
        raise RegionError(f"box {text} is degenerate (zero width) inside the {width}x{height} image")
    if y1 == y2:
        raise RegionError(f"box {text} is degenerate (zero height) inside the {width}x{height} image")
    return Box(x1, y1, x2, y2)


def _check_point_inside(point: Point, width: int, height: int) -> None:
    if not (0 <= point.x < width and 0 <= point.y < height):
        raise RegionError(
            f"point [{_fmt(point.x)}, {_fmt(point.y)}] lies outside the {width}x{height} image"
        )


def _check_free_form_size(region: FreeForm, width: int, height: int) -> None:
    if region.mask.shape != (height, width):
        raise RegionError(
            f"free-form mask has shape {region.mask.shape} but the image is {width}x{height} "
            f"(expected (H, W) = ({height}, {width}))"
        )


def region_to_grid(region: Region, width: int, height: int) -> list[int]:
    """The region's grid coordinates: [x, y] for a point, [x1, y1, x2, y2] otherwise."""
    width, height = _check_image_size(width, height)
    if isinstance(region, Point):
        _check_point_inside(region, width, height)
        return [pixel_to_grid(region.x, width), pixel_to_grid(region.y, height)]
    if isinstance(region, Box):
        b = clip_box(region, width, height)
        x1, y1, x2, y2 = b.coords
    elif isinstance(region, FreeForm):
        _check_free_form_size(region, width, height)
        x1, y1, x2, y2 = region.bbox  # may be one pixel wide: no degeneracy check
    else:
        raise RegionError(f"expected a Point, Box or FreeForm region, got {type(region).__name__}")
    return [
        pixel_to_grid(x1, width),
        pixel_to_grid(y1, height),
        pixel_to_grid(x2, width),
        pixel_to_grid(y2, height),
    ]


def _check_grid_coords(coords: Sequence[float], n: int, what: str) -> list[float]:
    try:
        values = list(coords)
    except TypeError:
        raise RegionError(f"{what} grid coordinates must be a sequence of {n} numbers, got {coords!r}") from None
    if len(values) != n:
        raise RegionError(f"{what} needs {n} grid coordinates, got {len(values)}: {values!r}")
    _check_finite(f"{what} grid", values)
    return [float(v) for v in values]


def grid_to_box(
    coords: Sequence[float], width: int, height: int, as_int: bool = False
) -> tuple[float, float, float, float]:
    """[x1, y1, x2, y2] on the grid -> pixel box. ``as_int`` truncates like the released eval."""
    width, height = _check_image_size(width, height)
    x1, y1, x2, y2 = _check_grid_coords(coords, 4, "box")
    box = (
        grid_to_pixel(x1, width),
        grid_to_pixel(y1, height),
        grid_to_pixel(x2, width),
        grid_to_pixel(y2, height),
    )
    return tuple(int(v) for v in box) if as_int else box  # type: ignore[return-value]


def grid_to_point(
    coords: Sequence[float], width: int, height: int, as_int: bool = False
) -> tuple[float, float]:
    """[x, y] on the grid -> pixel point. ``as_int`` truncates like the released code."""
    width, height = _check_image_size(width, height)
    x, y = _check_grid_coords(coords, 2, "point")
    point = (grid_to_pixel(x, width), grid_to_pixel(y, height))
    return tuple(int(v) for v in point) if as_int else point  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Prompt formatting


def format_coordinates(coords: Sequence[int]) -> str:
    """``[a, b, ...]`` with the released spacing (comma and one space)."""
    return "[" + ", ".join(str(int(c)) for c in coords) + "]"


def format_region(region: Region, width: int, height: int, with_token: bool = True) -> str:
    """``"[x1, y1, x2, y2] <region_fea>"`` / ``"[x, y] <region_fea>"`` on the 0-999 grid.

    A free-form region is written as its bounding box, as the released demo does.
    """
    text = format_coordinates(region_to_grid(region, width, height))
    return f"{text} {REGION_TOKEN}" if with_token else text


# ---------------------------------------------------------------------------------------------
# Parsing model text

_NUM = r"-?\d+(?:\.\d+)?"
# One coordinate group: optional opening bracket(s), numbers separated by commas (or blanks),
# optional closing bracket(s). A number must not continue a word ("x1", "v2.0").
_GROUP_RE = re.compile(
    rf"(?P<open>\[\s*)?(?<![\w.])(?P<nums>{_NUM}(?:(?:\s*,\s*|[ \t]+){_NUM})*)(?![\d.]*\w)(?P<close>\s*\]+)?"
)
_NUM_RE = re.compile(_NUM)
_SENTENCE_END_RE = re.compile(r"[.!?](?:\s+|$)|\n")
_BRACKETED_RE = re.compile(r"\[[^\[\]]*\]?")  # skipped groups and other bracketed junk
_PHRASE_STRIP = " \t\r\n,;:-[]()"
_LEADING_JOINERS_RE = re.compile(r"^(?:and|or|with|plus)\s+", re.IGNORECASE)


def _groups(text: str) -> list[tuple[int, int, list[float]]]:
    """(start, end, numbers) of each acceptable coordinate group in ``text``."""
    found = []
    for m in _GROUP_RE.finditer(text):
        nums_text = m.group("nums")
        numbers = [float(n) for n in _NUM_RE.findall(nums_text)]
        bracketed = m.group("open") is not None or m.group("close") is not None
        comma_separated = len(numbers) - 1 == nums_text.count(",")
        if not bracketed and not (len(numbers) == 4 and comma_separated):
            continue  # bare numbers in prose ("2 dogs", "1, 2") are not coordinates
        if len(numbers) in (2, 4):
            found.append((m.start(), m.end(), numbers))
        elif len(numbers) > 4 and len(numbers) % 4 == 0:
            # Several boxes run together without their inner brackets.
            for i in range(0, len(numbers), 4):
                found.append((m.start(), m.end(), numbers[i : i + 4]))
    return found


def _phrase_between(text: str) -> str:
    """The referring phrase in ``text`` (the text since the previous group): its last sentence."""
    text = _BRACKETED_RE.sub(" ", text.replace(REGION_TOKEN, " "))
    cut = 0
    for m in _SENTENCE_END_RE.finditer(text):
        if text[m.end():].strip(_PHRASE_STRIP):
            cut = m.end()
    phrase = " ".join(text[cut:].split()).strip(_PHRASE_STRIP)
    return _LEADING_JOINERS_RE.sub("", phrase).strip(_PHRASE_STRIP)


def parse_grounding(text: str, width: int, height: int) -> list[GroundedRegion]:
    """Boxes and points in model text, converted to pixels of a ``width`` x ``height`` image.

    Tolerates odd spacing, missing/doubled brackets, out-of-range numbers (clamped to 0-999),
    swapped corners (reordered), ``<region_fea>`` tokens and trailing garbage. Groups of other
    than 2 or 4 numbers are skipped. Consecutive groups with nothing but punctuation between them
    ("dogs [..], [..]") share the phrase. Never raises on the text; returns [] when nothing parses.
    """
    width, height = _check_image_size(width, height)
    if not isinstance(text, str):
        return []
    results: list[GroundedRegion] = []
    prev_end, prev_phrase = 0, ""
    for start, end, numbers in _groups(text):
        grid = [min(max(int(v), 0), GRID_SIZE - 1) for v in numbers]
        phrase = _phrase_between(text[prev_end:start])
        if not phrase and results:
            phrase = prev_phrase
        if len(grid) == 4:
            x1, x2 = sorted(grid[0::2])
            y1, y2 = sorted(grid[1::2])
            grid = [x1, y1, x2, y2]
            box, point = grid_to_box(grid, width, height), None
        else:
            box, point = None, grid_to_point(grid, width, height)
        results.append(GroundedRegion(phrase, box, point, tuple(grid), (start, end)))
        prev_end, prev_phrase = end, phrase
    return results


# ---------------------------------------------------------------------------------------------
# Region masks


def _segment_to_wh(segment, width: int, height: int) -> torch.Tensor:
    """An (H, W) segment (numpy or torch, bool or 0/1) -> bool tensor (W, H)."""
    if isinstance(segment, FreeForm):
        segment = segment.mask
    seg = segment.detach().cpu() if isinstance(segment, torch.Tensor) else torch.from_numpy(np.asarray(segment))
    if tuple(seg.shape) != (height, width):
        raise RegionError(
            f"segment mask has shape {tuple(seg.shape)} but the image is {width}x{height} "
            f"(expected (H, W) = ({height}, {width}))"
        )
    return (seg != 0).T.contiguous()


def _box_mask(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> torch.Tensor:
    mask = torch.zeros((width, height), dtype=torch.bool)
    mask[int(x1) : int(x2) + 1, int(y1) : int(y2) + 1] = True
    return mask


def region_mask(
    region: Region,
    width: int,
    height: int,
    segment=None,
    box: Box | None = None,
) -> torch.Tensor:
    """The binary mask a region contributes to the region sampler, shaped (W, H), indexed [x, y].

    * Point: the (2*POINT_SPAN+1)^2 window around it clipped to the image, intersected with
      ``segment`` (an (H, W) mask of the referred object) when given, else with ``box`` (the
      object's box) when given, as in the released training data. If that intersection is empty
      (the point lies off its object) the window alone is used.
    * Box: the box's pixels (x2, y2 inclusive), intersected with ``segment`` when given; an empty
      intersection falls back to the box (released behaviour).
    * FreeForm: its pixels (= its bounding box intersected with it), intersected with ``segment``
      when given, with the same fallback.
    """
    width, height = _check_image_size(width, height)
    seg = _segment_to_wh(segment, width, height) if segment is not None else None
    if isinstance(region, Point):
        _check_point_inside(region, width, height)
        x0, x1 = max(0.0, region.x - POINT_SPAN), min(float(width), region.x + POINT_SPAN + 1)
        y0, y1 = max(0.0, region.y - POINT_SPAN), min(float(height), region.y + POINT_SPAN + 1)
        window = torch.zeros((width, height), dtype=torch.bool)
        window[int(x0) : int(x1), int(y0) : int(y1)] = True
        if seg is not None:
            limit = seg
        elif box is not None:
            b = clip_box(box, width, height)
            limit = _box_mask(b.x1, b.y1, b.x2, b.y2, width, height)
        else:
            return window
        mask = window & limit
        return mask if mask.any() else window
    if isinstance(region, Box):
        b = clip_box(region, width, height)
        base = _box_mask(b.x1, b.y1, b.x2, b.y2, width, height)
    elif isinstance(region, FreeForm):
        _check_free_form_size(region, width, height)
        base = torch.from_numpy(region.mask.T.copy())
    else:
        raise RegionError(f"expected a Point, Box or FreeForm region, got {type(region).__name__}")
    if seg is None:
        return base
    mask = base & seg
    return mask if mask.any() else base
