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
from dataclasses import dataclass, field, replace
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
    "check_generate_request",
    "decode_request",
    "check_region_budget",
    "PendingImage",
    "PendingMask",
    "loads_json",
    "short",
    "is_finite_number",
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
    """Per-request resource limits (a server refuses what exceeds them with a 4xx).

    Every limit is checked before anything proportional to it is allocated: the image and mask
    sizes from their headers, region counts and the mask budget before any mask is built, the
    body size from Content-Length (or while it streams in), the JSON's shape before it is parsed.
    A region costs one byte per image pixel while the request runs (its mask), so
    ``max_region_mask_pixels`` bounds (regions in the conversation) x (image pixels).
    """

    max_image_pixels: int = 25_000_000
    max_body_bytes: int = 32 * 1024 * 1024
    max_new_tokens: int = 1024
    max_regions: int = 16  # per turn
    max_conversation_regions: int = 32  # all turns of one request together
    max_history_turns: int = 16
    max_region_mask_pixels: int = 128_000_000  # sum over the conversation's regions of the image's pixels
    max_json_containers: int = 10_000  # objects + arrays in one body (bounds nesting depth too)
    max_json_items: int = 100_000  # commas in one body (bounds the parsed size)
    max_pending_bytes: int = 256 * 1024 * 1024  # per worker: bodies (x2, with their decoded bytes) held at once


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
            with Image.open(io.BytesIO(raw)) as opened:
                width, height = opened.size
        except Image.DecompressionBombError:  # PIL's own guard (over 2 x Image.MAX_IMAGE_PIXELS)
            raise RequestError(
                f"{what} is over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP, over this server's "
                f"{max_pixels / 1e6:.1f} MP limit; downscale it first",
                status=413,
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise RequestError(f"{what} is not a readable image (corrupt or unknown format)") from None
    if width <= 0 or height <= 0:
        raise RequestError(f"{what} has zero size ({width}x{height})")
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
    return PendingImage(raw, _check_header(raw, max_pixels, what), what).decode()


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
# Values from clients

# Integers in requests are refused beyond this magnitude (no coordinate, count or size needs more).
MAX_JSON_INT = 10**15


def short(value: Any, limit: int = 60) -> str:
    """A client value for a one-line error message: its repr, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # e.g. an int too long to print
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_finite_number(value: Any) -> bool:
    """A real number a server can use: not a bool, not NaN/inf, integers within +-MAX_JSON_INT."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -MAX_JSON_INT <= value <= MAX_JSON_INT
    return math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Regions


def _numbers(value: Any, n: int, what: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise RequestError(f"{what} needs {n} numbers, got {short(value)}")
    out = []
    for v in value:
        if not is_finite_number(v):
            raise RequestError(f"{what} needs {n} finite numbers, got {short(value)}")
        out.append(v)
    return out


@dataclass(eq=False)
class PendingImage:
    """An image whose header was checked (size within the limit) but whose pixels are not decoded
    yet: servers decode it inside their concurrency limit (``decode_request``)."""

    raw: bytes
    size: tuple[int, int]
    what: str = "image"

    def decode(self) -> Image.Image:
        try:
            return load_image(self.raw)
        except ImageLoadError as error:
            raise RequestError(f"{self.what}: {error}") from None


@dataclass(eq=False)
class PendingMask:
    """A mask region whose PNG header was checked (same size as the image) but not decoded yet."""

    raw: bytes
    size: tuple[int, int]
    what: str = "region mask"

    def decode(self) -> FreeForm:
        try:
            with Image.open(io.BytesIO(self.raw)) as picture:
                picture.load()
                mask = stroke_mask(picture, self.size)
        except (OSError, SyntaxError, ValueError):
            raise RequestError(f"{self.what} is corrupt or truncated") from None
        try:
            return FreeForm(mask)
        except RegionError as error:
            raise RequestError(f"invalid region: {error}") from None


def region_from_json(
    obj: Any, width: int, height: int, max_pixels: int = ServeLimits.max_image_pixels, decode: bool = True
) -> Region | PendingMask:
    """A region object of the wire format -> Point / Box / FreeForm, checked against the image size.

    With ``decode=False`` a mask region comes back as a PendingMask (header checked, pixels not
    decoded): ``decode_request`` decodes it later.
    """
    if not isinstance(obj, dict):
        raise RequestError(f"a region must be an object like {{'type': 'box', 'box': [x1, y1, x2, y2]}}, got {short(obj)}")
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
            raw = _raw_bytes(obj["mask"], "region mask")
            mask_size = _check_header(raw, max_pixels, "region mask")
            if mask_size != (width, height):
                raise RequestError(f"region mask is {mask_size[0]}x{mask_size[1]} but the image is {width}x{height}")
            pending = PendingMask(raw, (width, height))
            return pending.decode() if decode else pending
    except RegionError as error:
        raise RequestError(f"invalid region: {error}") from None
    raise RequestError(f"unknown region type {short(kind)}: use 'box', 'point' or 'mask'")


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


def check_region_budget(counts: list[int], width: int, height: int, limits: ServeLimits) -> None:
    """Refuse a conversation whose regions (``counts``: per turn, the last one being the question)
    exceed the limits; called before any region mask is built."""
    for turn, count in enumerate(counts):
        if count > limits.max_regions:
            where = "" if turn == len(counts) - 1 else f"history[{turn}]: "
            raise RequestError(f"{where}{count} regions, over the limit of {limits.max_regions} per turn")
    total = sum(counts)
    if total > limits.max_conversation_regions:
        raise RequestError(
            f"the conversation has {total} regions, over the limit of {limits.max_conversation_regions}"
        )
    if total * width * height > limits.max_region_mask_pixels:
        raise RequestError(
            f"{total} regions on a {width}x{height} image need {total * width * height / 1e6:.0f} M mask pixels, "
            f"over this server's {limits.max_region_mask_pixels / 1e6:.0f} M; use fewer regions or a smaller image",
            status=413,
        )


# ---------------------------------------------------------------------------------------------
# Requests


def declared_length(request) -> int | None:
    """The body size a Starlette request's Content-Length header declares; None when there is
    none or it is not a plain number of at most 15 digits (the body is then cut while read)."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() and len(declared) < 16 else None


async def read_json_body(request, limits: ServeLimits = ServeLimits()) -> dict:
    """A Starlette request's JSON object; an oversize body is refused from its Content-Length
    header before it is read, and while it streams in when it has none."""
    declared = declared_length(request)
    if declared is not None and declared > limits.max_body_bytes:
        raise RequestError(
            f"request body is {declared / 2**20:.1f} MiB, over the {limits.max_body_bytes / 2**20:g} MiB limit", status=413
        )
    received = bytearray()
    async for part in request.stream():
        received += part
        if len(received) > limits.max_body_bytes:
            break
    return parse_json_body(bytes(received), limits)


class _BadJSONValue(ValueError):
    pass


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > 15:
        raise _BadJSONValue(f"integer {short(text, 24)} ({len(text.lstrip('-'))} digits) is too large")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSONValue(f"number {short(text, 24)} is out of range")
    return value


def _json_constant(text: str):
    raise _BadJSONValue(f"{text} is not a valid JSON number")


def loads_json(text: str | bytes, limits: ServeLimits = ServeLimits(), what: str = "request body") -> Any:
    """``json.loads`` for client text: refuses (RequestError 400) NaN/Infinity, integers over 15
    digits, non-finite floats, and bodies with more containers or items than the limits allow
    (checked before parsing, so a deep or huge structure costs nothing)."""
    raw = text.encode() if isinstance(text, str) else text
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > limits.max_json_containers:
        raise RequestError(f"{what} has {containers} JSON objects/arrays, over the limit of {limits.max_json_containers}")
    items = raw.count(b",")
    if items > limits.max_json_items:
        raise RequestError(f"{what} has {items} JSON items, over the limit of {limits.max_json_items}")
    try:
        return json.loads(raw, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except _BadJSONValue as error:
        raise RequestError(f"{what}: {error}") from None
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise RequestError(f"{what} is not valid JSON: {short(str(error), 120)}") from None


def parse_json_body(body: bytes, limits: ServeLimits = ServeLimits()) -> dict:
    """Raw request body -> JSON object, with clear errors for oversize or malformed bodies."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            f"request body is {len(body) / 2**20:.1f} MiB, over the {limits.max_body_bytes / 2**20:g} MiB limit", status=413
        )
    if not body:
        raise RequestError("request body is empty; expected a JSON object")
    data = loads_json(body, limits)
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def checked_number(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if not is_finite_number(value):
        raise RequestError(f"{key} must be a number, got {short(value)}")
    if not low <= value <= high:
        raise RequestError(f"{key} must be in [{low:g}, {high:g}], got {short(value)}")
    return float(value)


def checked_max_new_tokens(value: Any, limits: ServeLimits, key: str = "max_new_tokens") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limits.max_new_tokens:
        raise RequestError(f"{key} must be an integer in [1, {limits.max_new_tokens}], got {short(value)}")
    return value


def _region_list(items: Any, where: str) -> list:
    if items is None:
        return []
    if not isinstance(items, list):
        raise RequestError(f"{where}regions must be a list")
    return items


def check_generate_request(data: dict, limits: ServeLimits = ServeLimits()) -> GenerateRequest:
    """Everything about a request that can be checked without decoding pixels: types, numbers,
    counts, the image's and masks' sizes (from their headers) and the region budget. The result's
    image is a PendingImage and its mask regions PendingMasks; ``decode_request`` decodes them."""
    if not isinstance(data, dict):
        raise RequestError(f"request must be a JSON object, got {type(data).__name__}")
    if "image" not in data:
        raise RequestError("request has no 'image' (base64 or data URL)")
    raw = _raw_bytes(data["image"], "image")
    width, height = _check_header(raw, limits.max_image_pixels, "image")
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError("request needs a non-empty 'question' string")
    items = _region_list(data.get("regions"), "")
    history_items = data.get("history")
    if history_items is None:
        history_items = []
    if not isinstance(history_items, list):
        raise RequestError("history must be a list of {question, regions, answer} objects")
    if len(history_items) > limits.max_history_turns:
        raise RequestError(f"history has {len(history_items)} turns, over the limit of {limits.max_history_turns}")
    turn_items = []
    for i, turn in enumerate(history_items):
        if not isinstance(turn, dict) or not isinstance(turn.get("question"), str) or not isinstance(turn.get("answer"), str):
            raise RequestError(f"history[{i}] must be an object with 'question' and 'answer' strings")
        turn_items.append(_region_list(turn.get("regions"), f"history[{i}]: "))
    check_region_budget([len(t) for t in turn_items] + [len(items)], width, height, limits)

    def regions_of(objs: list) -> list:
        return [region_from_json(o, width, height, limits.max_image_pixels, decode=False) for o in objs]

    history = [
        Turn(turn["question"], turn["answer"], regions_of(turn_regions))
        for turn, turn_regions in zip(history_items, turn_items)
    ]
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {short(model)}")
    return GenerateRequest(
        image=PendingImage(raw, (width, height)),
        question=question,
        regions=regions_of(items),
        history=history,
        temperature=checked_number(data, "temperature", 0.0, 0.0, 2.0),
        top_p=checked_number(data, "top_p", 1.0, 0.0, 1.0),
        max_new_tokens=checked_max_new_tokens(data.get("max_new_tokens", 128), limits),
        model=model,
    )


def decode_request(request: GenerateRequest) -> GenerateRequest:
    """A checked request with its image and mask regions decoded (done inside the worker's
    concurrency limit: this is where a request's memory is allocated)."""

    def decoded(regions: list) -> list[Region]:
        return [r.decode() if isinstance(r, PendingMask) else r for r in regions]

    image = request.image.decode() if isinstance(request.image, PendingImage) else request.image
    return replace(
        request,
        image=image,
        regions=decoded(request.regions),
        history=[replace(turn, regions=decoded(turn.regions)) for turn in request.history],
    )


def parse_generate_request(data: dict, limits: ServeLimits = ServeLimits()) -> GenerateRequest:
    """A decoded JSON object -> GenerateRequest (image decoded, regions checked); RequestError otherwise."""
    return decode_request(check_generate_request(data, limits))


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
