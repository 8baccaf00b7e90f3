"""OpenAI-compatible chat API, served by each model worker.

``POST /v1/chat/completions`` takes the usual ``{"model", "messages", "temperature", "top_p",
"max_tokens", "stream"}``. The image is an ``image_url`` content part of a user message: a data
URL (``data:image/png;base64,...``) or a local path / ``file://`` URL inside the worker's
``--allowed-image-dir`` (anything else is refused with 403). Ferret takes one image per
conversation: the first one given.

Regions are written in the text the way Ferret reads them, on the 0-999 grid and followed by the
region token: ``"What is [120, 340, 560, 880] <region_fea>?"`` (a box) or ``"[250, 750]
<region_fea>"`` (a point). Free-form masks, or pixel regions, can be passed in the extension field
``"regions"`` (wire format of ``ferret.serve.protocol``) together with ``<region>`` placeholders.

``stream: true`` answers with server-sent events (``data: {chat.completion.chunk}`` ... ``data:
[DONE]``). Non-streamed answers carry the parsed boxes in ``choices[0].message.ferret_regions``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ferret.constants import REGION_TOKEN
from ferret.processing import REGION_PLACEHOLDER
from ferret.regions import Box, GroundedRegion, Point, RegionError, grid_to_box, grid_to_point
from ferret.serve.protocol import (
    GenerateRequest,
    PendingImage,
    RequestError,
    ServeLimits,
    Turn,
    UnknownModelError,
    _check_header,
    _raw_bytes,
    check_region_budget,
    checked_max_new_tokens,
    checked_number,
    declared_length,
    grounded_to_json,
    read_json_body,
    region_from_json,
    short,
)

__all__ = [
    "ChatWorker",
    "build_openai_router",
    "parse_chat_completion",
    "extract_text_regions",
    "count_text_regions",
    "resolve_local_image",
]


class Admission(Protocol):
    """A request's reservation in the worker's memory budget."""

    def release(self) -> None: ...


@runtime_checkable
class ChatWorker(Protocol):
    """What the router needs of the worker that serves it (`ferret.serve.model_worker.ModelWorker`
    is one); the router knows nothing else of it."""

    limits: ServeLimits
    allowed_image_dir: Path | None  # local image paths are read only inside it (None: none are)

    @property
    def model_names(self) -> list[str]: ...

    def admit(self, declared_bytes: int | None) -> Admission:
        """Reserve room for one request's body; RequestError 503 when the worker holds too much."""

    def check_request(self, request: GenerateRequest) -> None:
        """RequestError when the model cannot take this request."""

    async def open_stream(self, request: GenerateRequest, http_request: Request | None = None,
                          admission: Admission | None = None) -> AsyncIterator[str]:
        """The answer so far after each piece, within the worker's concurrency limit."""

    def grounding(self, text: str, request: GenerateRequest) -> list[GroundedRegion]:
        """The phrases and pixel boxes an answer names."""

# "[a, b, c, d] <region_fea>" or "[a, b] <region_fea>": a region written as Ferret reads it.
_REGION_IN_TEXT = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)(?:\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?))?\s*\]\s*"
    + re.escape(REGION_TOKEN)
)


class ForbiddenImagePath(RequestError):
    status = 403


def extract_text_regions(text: str, width: int, height: int) -> tuple[str, list]:
    """Grid regions written in ``text`` -> (text with `<region>` placeholders, pixel regions)."""
    regions = []

    def replace(match: re.Match) -> str:
        numbers = [float(g) for g in match.groups() if g is not None]
        if any(not 0 <= v <= 999 for v in numbers):
            raise RequestError(f"region {short(match.group(0))} has coordinates outside the 0-999 grid")
        try:
            if len(numbers) == 2:
                regions.append(Point(*grid_to_point(numbers, width, height)))
            else:
                regions.append(Box(*grid_to_box(numbers, width, height)))
        except RegionError as error:
            raise RequestError(f"invalid region {short(match.group(0))}: {error}") from None
        return REGION_PLACEHOLDER

    return _REGION_IN_TEXT.sub(replace, text), regions


def count_text_regions(text: str) -> int:
    """How many grid regions (``[...] <region_fea>``) ``text`` writes (nothing is built)."""
    return sum(1 for _ in _REGION_IN_TEXT.finditer(text))


def resolve_local_image(reference: str, allowed_dir: Path | None) -> Path:
    """A local path or file:// URL -> resolved path, refused unless inside ``allowed_dir``."""
    path_text = unquote(urlparse(reference).path) if reference.startswith("file://") else reference
    if allowed_dir is None:
        raise ForbiddenImagePath(
            "local image paths are disabled on this server (start the worker with --allowed-image-dir); "
            "send the image as a data URL"
        )
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = allowed_dir / path
    resolved = path.resolve()
    if resolved != allowed_dir and allowed_dir not in resolved.parents:
        raise ForbiddenImagePath(f"image path {path_text!r} is outside the allowed folder")
    if not resolved.is_file():
        raise RequestError(f"image file {path_text!r} does not exist", status=404)
    return resolved


def _message_parts(message: dict, index: int) -> tuple[str, list[str]]:
    """(text, image references) of one chat message."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise RequestError(f"messages[{index}].content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        if not isinstance(part, dict):
            raise RequestError(f"messages[{index}].content parts must be objects")
        if part.get("type") == "text":
            text = part.get("text", "")
            if not isinstance(text, str):
                raise RequestError(f"messages[{index}] has a text part whose text is not a string: {short(text)}")
            texts.append(text)
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RequestError(f"messages[{index}] has an image_url part without a url")
            images.append(url)
        else:
            raise RequestError(f"messages[{index}] has an unsupported content part type {short(part.get('type'))}")
    return " ".join(t for t in texts if t), images


def _load_reference(reference: str, worker: ChatWorker) -> PendingImage:
    """The image a reference names, its header checked (pixels are decoded later, inside the
    worker's concurrency limit)."""
    limits = worker.limits
    if reference.startswith("data:"):
        raw, what = _raw_bytes(reference, "image"), "image"
    elif reference.startswith(("http://", "https://")):
        raise RequestError("remote image URLs are not fetched by this server; send a data URL")
    else:
        path = resolve_local_image(reference, worker.allowed_image_dir)
        what = f"image {path.name!r}"
        size = path.stat().st_size
        if size > limits.max_body_bytes:
            raise RequestError(
                f"{what} is {size / 2**20:.1f} MiB, over the {limits.max_body_bytes / 2**20:g} MiB limit", status=413
            )
        raw = path.read_bytes()
    return PendingImage(raw, _check_header(raw, limits.max_image_pixels, what), what)


def parse_chat_completion(data: dict, worker: ChatWorker) -> tuple[GenerateRequest, bool]:
    """An OpenAI chat request -> (GenerateRequest, stream?), checked against the worker's limits;
    the image is a PendingImage (and mask regions PendingMasks) until the worker decodes them."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("request needs a non-empty 'messages' list")
    turns: list[tuple[str, str]] = []  # (role, text) without system messages
    image_refs: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be an object with role system, user or assistant")
        text, images = _message_parts(message, i)
        image_refs += images
        if message["role"] != "system":
            turns.append((message["role"], text))
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {short(model)}")
    if model is not None and model not in worker.model_names:
        raise UnknownModelError(f"model {short(model)} is not served here; available: {worker.model_names}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {short(stream)}")
    if not image_refs:
        raise RequestError("Ferret needs an image: add an image_url part (data URL or allowed local path)")
    if not turns or turns[-1][0] != "user":
        raise RequestError("the last message must come from the user")
    image = _load_reference(image_refs[0], worker)
    width, height = image.size

    limits = worker.limits
    exchanges, pending = [], None
    for role, text in turns[:-1]:
        if role == "user":
            pending = text
        elif pending is not None:
            exchanges.append((pending, text))
            pending = None
    if len(exchanges) > limits.max_history_turns:
        raise RequestError(f"the conversation has {len(exchanges)} earlier exchanges, over the limit of {limits.max_history_turns}")
    extra = data.get("regions")
    if extra is None:
        extra = []
    if not isinstance(extra, list):
        raise RequestError("regions must be a list of region objects")
    # Regions are counted (a regex scan) before any of them is built, then the budget is checked.
    counts = [count_text_regions(asked) for asked, _ in exchanges] + [count_text_regions(turns[-1][1]) + len(extra)]
    check_region_budget(counts, width, height, limits)
    history = []
    for asked, answer in exchanges:
        question, regions = extract_text_regions(asked, width, height)
        history.append(Turn(question, answer, regions))
    question, regions = extract_text_regions(turns[-1][1], width, height)
    regions += [region_from_json(r, width, height, limits.max_image_pixels, decode=False) for r in extra]
    if not question.strip():
        raise RequestError("the last user message has no text")

    request = GenerateRequest(
        image=image,
        question=question,
        regions=regions,
        history=history,
        temperature=checked_number(data, "temperature", 0.0, 0.0, 2.0),
        top_p=checked_number(data, "top_p", 1.0, 0.0, 1.0),
        max_new_tokens=checked_max_new_tokens(
            data.get("max_tokens", data.get("max_completion_tokens", 256)), worker.limits, "max_tokens"
        ),
    )
    worker.check_request(request)
    return request, stream


def _sse(payload: dict | str) -> bytes:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {body}\n\n".encode()


def build_openai_router(worker: ChatWorker) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ferret"} for name in worker.model_names],
        }

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        admission = worker.admit(declared_length(request))
        try:
            data = await read_json_body(request, worker.limits)
            generate, stream = await run_in_threadpool(parse_chat_completion, data, worker)
            del data
            # Waits for the concurrency limit; a client that disconnects meanwhile (or later,
            # streamed or not) cancels its generation.
            texts = await worker.open_stream(generate, request, admission)
        except BaseException:
            admission.release()
            raise
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = worker.model_names[0]

        if not stream:
            text = ""
            try:
                async for text in texts:
                    pass
            finally:
                await texts.aclose()
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text,
                                "ferret_regions": grounded_to_json(worker.grounding(text, generate))},
                    "finish_reason": "stop",
                }],
            }

        async def events():
            base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            sent = ""
            try:
                async for text in texts:
                    delta, sent = text[len(sent):], text
                    if delta:
                        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]})
            except Exception as error:  # the status line is sent; report in-band
                yield _sse({"error": {"message": f"generation failed: {type(error).__name__}", "type": "server_error"}})
                return
            finally:
                await texts.aclose()
            yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return router
