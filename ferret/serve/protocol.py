"""Wire format shared by the controller, the model workers, the web server and the API.

A generation request (``POST /worker_generate_stream``) is one JSON object::

    {"model": "tiny-ferret",                       # optional on a worker
     "image": "<base64 | data:image/...;base64,...>",
     "question": "What is <region>?",              # `<region>` placeholders, else regions are appended
     "regions": [{"type": "box", "box": [x1, y1, x2, y2]},      # raw-image pixels, x2/y2 inclusive
                 {"type": "point", "point": [x, y]},
                 {"type": "mask", "mask": "<base64 PNG, nonzero = inside, same size as the image>"}],
     "history": [{"question": "...", "regions": [...], "answer": "..."}],
     "temperature": 0.2, "top_p": 0.7, "max_new_tokens": 128}

The answer streams as newline-delimited JSON chunks ``{"text": <answer so far>, "error_code": 0}``;
the last one adds ``"done": true`` and ``"regions"`` (the grounded boxes/points parsed from the
answer, in pixels). A failure after streaming started is a chunk with ``error_code`` != 0 and an
``"error"`` message. Invalid requests are refused before streaming: HTTP 4xx with
``{"error": {"message": "<message>", "type": "invalid_request_error"}}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ferret.processing import ImageLoadError, load_image
from ferret.regions import Box, FreeForm, GroundedRegion, Point, Region, RegionError
from ferret.serve.drawing import stroke_mask

__all__ = [
    "RequestError",
    "UnknownModelError",
    "Turn",
    "GenerateRequest",
    "ServeLimits",
    "decode_image",
    "decode_mask",
    "encode_image",
    "region_from_json",
    "region_to_json",
    "parse_generate_request",
    "parse_json_body",
    "read_json_body",
    "checked_max_new_tokens",
    "checked_number",
    "chunk",
    "grounded_to_json",
    "iter_chunks",
]

# Sampling bounds the servers accept; beyond them a request is refused rather than clamped.
MAX_NEW_TOKENS_LIMIT = 2048


class RequestError(ValueError):
    """A client request is invalid; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class UnknownModelError(RequestError):
    """The request names a model no worker serves."""

    status = 404


@dataclass(frozen=True)
class ServeLimits:
    """Per-request resource limits (a server refuses what exceeds them with a 4xx)."""

    max_image_pixels: int = 25_000_000
    max_body_bytes: int = 32 * 1024 * 1024
    max_new_tokens: int = 1024
    max_regions: int = 16
    max_history_turns: int = 16


@dataclass
class Turn:
    """One earlier exchange of a conversation: the question (with its regions) and the answer."""

    question: str
    answer: str
    regions: list[Region] = field(default_factory=list)


@dataclass
class GenerateRequest:
    image: Image.Image
    question: str
    regions: list[Region] = field(default_factory=list)
    history: list[Turn] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    model: str | None = None


# ---------------------------------------------------------------------------------------------
# Images


def _b64decode(data: str, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what} must be a non-empty base64 string")
    if data.startswith("data:"):
        header, sep, payload = data.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(f"{what} is a data URL without base64 payload (expected data:image/...;base64,...)")
        data = payload
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None


def _raw_bytes(data: str | bytes, what: str) -> bytes:
    raw = data if isinstance(data, (bytes, bytearray)) else _b64decode(data, what)
    if not raw:
        raise RequestError(f"{what} is empty")
    return bytes(raw)


def _check_header(raw: bytes, max_pixels: int, what: str) -> tuple[int, int]:
    """The image's (width, height) from its header; refuses unreadable or oversized images."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            width, height = Image.open(io.BytesIO(raw)).size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise RequestError(f"{what} is not a readable image (corrupt or unknown format)") from None
    if width * height > max_pixels:
        raise RequestError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} MP, over this server's "
            f"{max_pixels / 1e6:.1f} MP limit; downscale it first",
            status=413,
        )
    return width, height


def decode_image(data: str | bytes, max_pixels: int = ServeLimits.max_image_pixels, what: str = "image") -> Image.Image:
    """Base64 / data-URL string (or raw bytes) -> RGB image; refuses corrupt or oversized images.

    The size is read from the header before any pixel is decoded, so a huge image costs nothing.
    """
    raw = _raw_bytes(data, what)
    _check_header(raw, max_pixels, what)
    try:
        return load_image(raw)
    except ImageLoadError as error:
        raise RequestError(f"{what}: {error}") from None


def decode_mask(
    data: str | bytes, size: tuple[int, int], max_pixels: int = ServeLimits.max_image_pixels, what: str = "region mask"
) -> np.ndarray:
    """A mask image (base64 / bytes) -> (H, W) bool array for an image of ``size`` = (W, H).

    With an alpha channel the painted (non-transparent) pixels are the region, else the nonzero
    ones, so both a black/white mask and a transparent stroke layer work.
    """
    raw = _raw_bytes(data, what)
    width, height = _check_header(raw, max_pixels, what)
    if (width, height) != tuple(size):
        raise RequestError(f"{what} is {width}x{height} but the image is {size[0]}x{size[1]}")
    try:
        with Image.open(io.BytesIO(raw)) as picture:
            picture.load()
            return stroke_mask(picture, (width, height))
    except (OSError, SyntaxError, ValueError):
        raise RequestError(f"{what} is corrupt or truncated") from None


def encode_image(image: Image.Image, fmt: str = "PNG") -> str:
    """PIL image -> base64 string (PNG by default, lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Regions


def _numbers(value: Any, n: int, what: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise RequestError(f"{what} needs {n} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RequestError(f"{what} needs {n} finite numbers, got {value!r}")
        out.append(v)
    return out


def region_from_json(obj: Any, width: int, height: int, max_pixels: int = ServeLimits.max_image_pixels) -> Region:
    """A region object of the wire format -> Point / Box / FreeForm, checked against the image size."""
    if not isinstance(obj, dict):
        raise RequestError(f"a region must be an object like {{'type': 'box', 'box': [x1, y1, x2, y2]}}, got {obj!r}")
    kind = obj.get("type") or next((k for k in ("box", "point", "mask") if k in obj), None)
    try:
        if kind == "box":
            x1, y1, x2, y2 = _numbers(obj.get("box"), 4, "box region")
            region: Region = Box(x1, y1, x2, y2)
            if x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1:
                raise RegionError(f"box [{x1}, {y1}, {x2}, {y2}] lies wholly outside the {width}x{height} image")
            return region
        if kind == "point":
            x, y = _numbers(obj.get("point"), 2, "point region")
            if not (0 <= x < width and 0 <= y < height):
                raise RegionError(f"point [{x}, {y}] lies outside the {width}x{height} image")
            return Point(x, y)
        if kind == "mask":
            if not isinstance(obj.get("mask"), str):
                raise RequestError("mask region needs 'mask': a base64 PNG")
            return FreeForm(decode_mask(obj["mask"], (width, height), max_pixels))
    except RegionError as error:
        raise RequestError(f"invalid region: {error}") from None
    raise RequestError(f"unknown region type {kind!r}: use 'box', 'point' or 'mask'")


def region_to_json(region: Region) -> dict:
    """Point / Box / FreeForm -> wire-format region object."""
    if isinstance(region, Point):
        return {"type": "point", "point": [region.x, region.y]}
    if isinstance(region, Box):
        return {"type": "box", "box": list(region.coords)}
    if isinstance(region, FreeForm):
        mask = Image.fromarray(region.mask.astype(np.uint8) * 255, mode="L")
        return {"type": "mask", "mask": encode_image(mask)}
    raise TypeError(f"not a region: {region!r}")


def grounded_to_json(regions: list[GroundedRegion]) -> list[dict]:
    return [
        {"phrase": r.phrase, "box": list(r.box) if r.box else None, "point": list(r.point) if r.point else None}
        for r in regions
    ]


# ---------------------------------------------------------------------------------------------
# Requests


async def read_json_body(request, limits: ServeLimits = ServeLimits()) -> dict:
    """A Starlette request's JSON object; an oversize body is refused from its Content-Length
    header before it is read, and while it streams in when it has none."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(
            f"request body is {int(declared) / 2**20:.1f} MiB, over the {limits.max_body_bytes / 2**20:g} MiB limit", status=413
        )
    received = bytearray()
    async for part in request.stream():
        received += part
        if len(received) > limits.max_body_bytes:
            break
    return parse_json_body(bytes(received), limits)


def parse_json_body(body: bytes, limits: ServeLimits = ServeLimits()) -> dict:
    """Raw request body -> JSON object, with clear errors for oversize or malformed bodies."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            f"request body is {len(body) / 2**20:.1f} MiB, over the {limits.max_body_bytes / 2**20:g} MiB limit", status=413
        )
    if not body:
        raise RequestError("request body is empty; expected a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def checked_number(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{key} must be a number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{key} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def checked_max_new_tokens(value: Any, limits: ServeLimits, key: str = "max_new_tokens") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_new_tokens:
        raise RequestError(f"{key} must be an integer in [1, {limits.max_new_tokens}], got {value!r}")
    return value


def _regions(items: Any, width: int, height: int, limits: ServeLimits, where: str) -> list[Region]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise RequestError(f"{where}regions must be a list")
    if len(items) > limits.max_regions:
        raise RequestError(f"{where}{len(items)} regions, over the limit of {limits.max_regions}")
    return [region_from_json(item, width, height, limits.max_image_pixels) for item in items]


def parse_generate_request(data: dict, limits: ServeLimits = ServeLimits()) -> GenerateRequest:
    """A decoded JSON object -> GenerateRequest (image decoded, regions checked); RequestError otherwise."""
    if "image" not in data:
        raise RequestError("request has no 'image' (base64 or data URL)")
    image = decode_image(data["image"], limits.max_image_pixels)
    width, height = image.size
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError("request needs a non-empty 'question' string")
    regions = _regions(data.get("regions"), width, height, limits, "")
    history_items = data.get("history") or []
    if not isinstance(history_items, list):
        raise RequestError("history must be a list of {question, regions, answer} objects")
    if len(history_items) > limits.max_history_turns:
        raise RequestError(f"history has {len(history_items)} turns, over the limit of {limits.max_history_turns}")
    history = []
    for i, turn in enumerate(history_items):
        if not isinstance(turn, dict) or not isinstance(turn.get("question"), str) or not isinstance(turn.get("answer"), str):
            raise RequestError(f"history[{i}] must be an object with 'question' and 'answer' strings")
        history.append(Turn(turn["question"], turn["answer"], _regions(turn.get("regions"), width, height, limits, f"history[{i}]: ")))
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}")
    return GenerateRequest(
        image=image,
        question=question,
        regions=regions,
        history=history,
        temperature=checked_number(data, "temperature", 0.0, 0.0, 2.0),
        top_p=checked_number(data, "top_p", 1.0, 0.0, 1.0),
        max_new_tokens=checked_max_new_tokens(data.get("max_new_tokens", 128), limits),
        model=model,
    )


# ---------------------------------------------------------------------------------------------
# Streaming


def chunk(text: str, error_code: int = 0, **extra) -> bytes:
    """One newline-terminated JSON chunk of a generation stream."""
    return json.dumps({"text": text, "error_code": error_code, **extra}).encode() + b"\n"


def iter_chunks(lines) -> Any:
    """Decode a stream of JSON lines (an iterable of str/bytes lines), skipping blank ones."""
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        line = line.strip()
        if line:
            yield json.loads(line)
