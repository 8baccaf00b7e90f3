"""Serving wire format: images, regions, requests, OpenAI message parsing, local-path policy."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from ferret.regions import Box, FreeForm, Point, format_region
from ferret.serve.openai_api import ForbiddenImagePath, extract_text_regions, resolve_local_image
from ferret.serve.protocol import (
    RequestError,
    ServeLimits,
    decode_image,
    encode_image,
    parse_generate_request,
    parse_json_body,
    region_from_json,
    region_to_json,
)


def huge_png() -> bytes:
    """A valid 10,000 x 10,000 PNG (100 MP, 12 KB: one bit per pixel, all black)."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def picture():
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    return image, encode_image(image)


def test_image_round_trip_base64_and_data_url(picture):
    image, b64 = picture
    assert decode_image(b64).size == (40, 30)
    decoded = decode_image("data:image/png;base64," + b64)
    assert decoded.mode == "RGB" and decoded.getpixel((3, 3)) == (200, 10, 10)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("not base64 !!!", "not valid base64"),
        (base64.b64encode(b"garbage bytes, not an image").decode(), "not a readable image"),
        ("data:image/png,abc", "without base64 payload"),
        ("", "non-empty"),
    ],
)
def test_bad_images_are_refused_with_a_message(data, fragment):
    with pytest.raises(RequestError, match=fragment) as info:
        decode_image(data)
    assert info.value.status == 400


def test_huge_image_is_refused_from_its_header_without_decoding():
    data = base64.b64encode(huge_png()).decode()
    with pytest.raises(RequestError, match=r"10000x10000 = 100.0 MP, over") as info:
        decode_image(data, max_pixels=ServeLimits().max_image_pixels)
    assert info.value.status == 413


def test_truncated_image_is_refused():
    good = base64.b64decode(encode_image(Image.new("RGB", (64, 64), (1, 2, 3))))
    with pytest.raises(RequestError, match="corrupt or truncated|not a readable"):
        decode_image(base64.b64encode(good[: len(good) // 2]).decode())


def test_regions_from_json():
    assert region_from_json({"type": "box", "box": [1, 2, 30, 20]}, 40, 30) == Box(1, 2, 30, 20)
    assert region_from_json({"point": [5, 6]}, 40, 30) == Point(5, 6)
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:9, 10:20] = True
    region = region_from_json(region_to_json(FreeForm(mask)), 40, 30)
    assert isinstance(region, FreeForm) and np.array_equal(region.mask, mask)


def test_mask_with_alpha_uses_the_painted_pixels():
    layer = Image.new("RGBA", (40, 30), (255, 255, 255, 0))  # transparent white: not the region
    layer.paste((255, 0, 0, 255), (5, 6, 15, 16))
    region = region_from_json({"type": "mask", "mask": encode_image(layer)}, 40, 30)
    assert region.mask.sum() == 100 and region.bbox == (5, 6, 14, 15)


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ({"type": "box", "box": [50, 50, 60, 60]}, "wholly outside"),
        ({"type": "box", "box": [10, 10, 5, 5]}, "malformed"),
        ({"type": "box", "box": [1, 2, 3]}, "needs 4 numbers"),
        ({"type": "box", "box": [1, 2, "x", 4]}, "finite numbers"),
        ({"type": "point", "point": [40, 3]}, "outside"),
        ({"type": "mask", "mask": encode_image(Image.new("L", (40, 30), 0))}, "empty"),
        ({"type": "mask", "mask": encode_image(Image.new("L", (8, 8), 255))}, "region mask is 8x8 but the image is 40x30"),
        ({"type": "polygon"}, "unknown region type"),
        ([1, 2, 3, 4], "must be an object"),
    ],
)
def test_bad_regions_are_refused(obj, fragment):
    with pytest.raises(RequestError, match=fragment):
        region_from_json(obj, 40, 30)


def test_parse_generate_request(picture):
    _, b64 = picture
    request = parse_generate_request({
        "image": b64, "question": "What is <region>?", "regions": [{"type": "box", "box": [1, 1, 20, 20]}],
        "history": [{"question": "Hi", "answer": "Hello", "regions": []}],
        "temperature": 0.5, "top_p": 0.9, "max_new_tokens": 7, "model": "m",
    })
    assert request.image.size == (40, 30) and request.regions == [Box(1, 1, 20, 20)]
    assert (request.temperature, request.top_p, request.max_new_tokens, request.model) == (0.5, 0.9, 7, "m")
    assert request.history[0].answer == "Hello"


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"image": None}, "base64"),
        ({"question": "  "}, "non-empty 'question'"),
        ({"temperature": -1}, r"temperature must be in \[0, 2\]"),
        ({"top_p": "high"}, "top_p must be a number"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": 10**6}, "max_new_tokens must be an integer"),
        ({"regions": {"type": "box"}}, "regions must be a list"),
        ({"history": [{"question": 1}]}, r"history\[0\]"),
        ({"model": 3}, "model must be a string"),
    ],
)
def test_bad_requests_are_refused(picture, change, fragment):
    data = {"image": picture[1], "question": "What?", **change}
    with pytest.raises(RequestError, match=fragment):
        parse_generate_request(data)


def test_missing_image_is_named():
    with pytest.raises(RequestError, match="no 'image'"):
        parse_generate_request({"question": "q"})


@pytest.mark.parametrize(
    "body, fragment, status",
    [(b"{bad json", "not valid JSON", 400), (b"[1, 2]", "JSON object", 400), (b"", "empty", 400),
     (b"{" + b" " * 200 + b"}", "over the", 413)],
)
def test_parse_json_body_errors(body, fragment, status):
    with pytest.raises(RequestError, match=fragment) as info:
        parse_json_body(body, ServeLimits(max_body_bytes=100))
    assert info.value.status == status


def test_text_regions_round_trip_to_the_same_prompt():
    width, height = 480, 320
    text = "Compare [83, 125, 291, 437] <region_fea> with [625, 187] <region_fea> please"
    question, regions = extract_text_regions(text, width, height)
    assert question == "Compare <region> with <region> please"
    assert isinstance(regions[0], Box) and isinstance(regions[1], Point)
    assert format_region(regions[0], width, height) == "[83, 125, 291, 437] <region_fea>"
    assert format_region(regions[1], width, height) == "[625, 187] <region_fea>"


def test_text_regions_outside_the_grid_are_refused():
    with pytest.raises(RequestError, match="outside the 0-999 grid"):
        extract_text_regions("what is [10, 10, 1500, 20] <region_fea>", 100, 100)


def test_local_image_paths_stay_inside_the_allowed_folder(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    (allowed / "link.png").symlink_to(secret)
    assert resolve_local_image(str(allowed / "a.png"), allowed.resolve()) == (allowed / "a.png").resolve()
    assert resolve_local_image("file://" + str(allowed / "a.png"), allowed.resolve()).name == "a.png"
    for outside in (str(secret), str(allowed / ".." / "secret.png"), str(allowed / "link.png"), "/etc/passwd"):
        with pytest.raises(ForbiddenImagePath, match="outside the allowed folder") as info:
            resolve_local_image(outside, allowed.resolve())
        assert info.value.status == 403
    with pytest.raises(ForbiddenImagePath, match="disabled"):
        resolve_local_image(str(allowed / "a.png"), None)
    with pytest.raises(RequestError, match="does not exist"):
        resolve_local_image(str(allowed / "missing.png"), allowed.resolve())


def test_the_openai_router_knows_the_worker_only_through_its_protocol():
    """One-way dependency: the router module does not import the worker module, and the worker
    has every method of the `ChatWorker` protocol the router is built on."""
    import subprocess
    import sys

    from ferret.serve.model_worker import ModelWorker
    from ferret.serve.openai_api import ChatWorker

    probe = "import sys, ferret.serve.openai_api; print('ferret.serve.model_worker' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    methods = [name for name, value in vars(ChatWorker).items() if callable(value) or isinstance(value, property)]
    assert {"model_names", "admit", "check_request", "open_stream", "grounding"} <= set(methods)
    assert all(hasattr(ModelWorker, name) for name in methods if not name.startswith("_"))
