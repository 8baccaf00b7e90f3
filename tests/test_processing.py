"""Tests of ferret.processing: image loading, the CLIP processor, FerretProcessor, sample images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ferret
from ferret.constants import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN
from ferret.processing import (
    FerretProcessor,
    ImageLoadError,
    ImageNotFoundError,
    build_image_processor,
    build_question,
    load_image,
    preprocess_images,
)
from ferret.regions import Box, FreeForm, Point, region_mask

EXAMPLES = Path(ferret.__file__).parent / "assets" / "examples"


def _png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# load_image


def test_load_from_path_bytes_and_pil(tmp_path):
    rgb = Image.new("RGB", (30, 20), (10, 200, 30))
    path = tmp_path / "a.png"
    rgb.save(path)
    for src in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), rgb):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (30, 20)
        assert out.getpixel((5, 5)) == (10, 200, 30)


def test_exif_orientation_is_applied():
    # 40 wide x 20 high, left half red; EXIF 6 = "rotate 90 CW to view"
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    out = load_image(_png_bytes(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)  # upright: now tall
    r, g, b = out.getpixel((10, 5))  # the red half ends up on top after a clockwise turn
    assert r > 200 and b < 60


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 255, 128))
    out = load_image(_png_bytes(rgba))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)
    r, g, b = out.getpixel((2, 2))
    assert abs(r - 127) <= 2 and abs(b - 255) <= 1
    la = Image.new("LA", (3, 3), (0, 0))
    assert load_image(_png_bytes(la)).getpixel((1, 1)) == (255, 255, 255)


def test_palette_grayscale_cmyk_and_16_bit():
    pal = Image.new("P", (5, 5))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((2, 2), 1)
    out = load_image(_png_bytes(pal))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (200, 100, 50)

    pal_t = Image.new("P", (5, 5), 0)
    pal_t.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    pal_t.info["transparency"] = 0
    assert load_image(_png_bytes(pal_t, transparency=0)).getpixel((0, 0)) == (255, 255, 255)

    gray = Image.new("L", (5, 5), 77)
    assert load_image(_png_bytes(gray)).getpixel((0, 0)) == (77, 77, 77)

    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # red in CMYK
    r, g, b = load_image(_png_bytes(cmyk, "JPEG", quality=95)).getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60

    deep = Image.fromarray(np.full((4, 6), 65535 // 2, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    out = load_image(_png_bytes(deep))
    assert out.size == (6, 4) and abs(out.getpixel((0, 0))[0] - 128) <= 1  # scaled, not clipped


def test_bad_images_raise_clear_errors(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageNotFoundError, match="nope.jpg"):
        load_image(missing)
    assert issubclass(ImageNotFoundError, FileNotFoundError) and issubclass(ImageNotFoundError, ValueError)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png.*empty"):
        load_image(empty)

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        load_image(corrupt)

    data = _png_bytes(Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"truncated\.png.*(corrupt|truncated)"):
        load_image(truncated)

    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="cannot load an image from int"):
        load_image(42)
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_decompression_bomb_refused(monkeypatch, tmp_path):
    import ferret.processing as processing

    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageLoadError, match=r"big\.png.*200x100.*decompression bomb"):
        load_image(path)


# ---------------------------------------------------------------------------------------------
# image processor


def test_image_processor_square_nocrop_matches_manual():
    proc = build_image_processor(image_size=48)
    assert proc.do_center_crop is False and proc.resample == Image.Resampling.BICUBIC
    rng = np.random.default_rng(1)
    image = Image.fromarray((rng.random((30, 70, 3)) * 255).astype(np.uint8))  # wide
    pixels = preprocess_images([image], proc)
    assert pixels.shape == (1, 3, 48, 48) and pixels.dtype == torch.float32
    resized = np.asarray(image.resize((48, 48), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    manual = (resized - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert np.allclose(pixels[0].permute(1, 2, 0).numpy(), manual, atol=1e-4)


def test_image_processor_batch_and_default_size():
    proc = build_image_processor()
    imgs = [Image.new("RGB", (100, 40), (255, 0, 0)), Image.new("L", (20, 90), 0)]
    pixels = preprocess_images(imgs, proc)
    assert pixels.shape == (2, 3, 336, 336)
    assert torch.allclose(pixels[0, 0], torch.full((336, 336), (1 - CLIP_MEAN[0]) / CLIP_STD[0]), atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        build_image_processor(image_size=0)
    with pytest.raises(ValueError, match="3 values"):
        build_image_processor(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="positive"):
        build_image_processor(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([], proc)


# ---------------------------------------------------------------------------------------------
# build_question


def test_build_question_placeholders_and_append():
    q = build_question("What is <region> next to <region>?", [Box(64, 48, 320, 240), Point(320, 240)], 640, 480)
    assert q == f"What is [100, 100, 500, 500] {REGION_TOKEN} next to [500, 500] {REGION_TOKEN}?"
    q = build_question("Describe this region.", [Point(320, 240)], 640, 480)
    assert q == f"Describe this region. [500, 500] {REGION_TOKEN}"
    assert build_question("No regions.", [], 640, 480) == "No regions."
    with pytest.raises(ValueError, match="2 <region> placeholder.*1 region"):
        build_question("<region> and <region>", [Point(1, 1)], 640, 480)


# ---------------------------------------------------------------------------------------------
# FerretProcessor


@pytest.fixture
def processor(tiny_tokenizer):
    return FerretProcessor(tiny_tokenizer, build_image_processor(image_size=28))


def test_processor_batch(processor, tiny_tokenizer):
    img_a = Image.new("RGB", (64, 48), (200, 10, 10))
    img_b = Image.new("RGB", (40, 80), (10, 10, 200))
    box, point = Box(8, 6, 40, 30), Point(20, 60)
    conv_a = [
        ("USER", build_question("What is <region>?", [box], 64, 48)),
        ("ASSISTANT", "A red thing [125, 125, 640, 645]."),
    ]
    conv_b = [("USER", "<image>\n" + build_question("And <region>?", [point], 40, 80)), ("ASSISTANT", None)]
    out = processor([img_a, img_b], [conv_a, conv_b], [[box], [point]])

    ids, attn, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.shape == attn.shape == labels.shape and ids.shape[0] == 2
    assert out["pixel_values"].shape == (2, 3, 28, 28)
    assert out["image_sizes"] == [(64, 48), (40, 80)]
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    for row in range(2):
        n = int(attn[row].sum())
        assert (ids[row, :n] == IMAGE_TOKEN_INDEX).sum() == 1  # <image> added to sample A
        assert (ids[row, :n] == region_id).sum() == 1
        assert (ids[row, n:] == tiny_tokenizer.pad_token_id).all()
        assert (labels[row, n:] == IGNORE_INDEX).all()
    assert (labels[1] == IGNORE_INDEX).all()  # generation prompt: nothing supervised
    supervised = ids[0][labels[0] != IGNORE_INDEX].tolist()
    assert tiny_tokenizer.decode(supervised) == " A red thing [125, 125, 640, 645].</s>"

    masks = out["region_masks"]
    assert len(masks) == 2 and len(masks[0]) == len(masks[1]) == 1
    assert masks[0][0].shape == (64, 48) and masks[1][0].shape == (40, 80)
    assert torch.equal(masks[0][0], region_mask(box, 64, 48))
    assert torch.equal(masks[1][0], region_mask(point, 40, 80))


def test_processor_free_form_mask_tensor_and_order(processor):
    img = Image.new("RGB", (32, 24))
    scribble = np.zeros((24, 32), bool)
    scribble[3:6, 4:9] = True
    ready = torch.zeros((32, 24), dtype=torch.bool)
    ready[20, 20] = True
    regions = [FreeForm(scribble), Point(30, 2), ready]
    question = build_question("<region> vs <region>", regions[:2], 32, 24) + f" vs [1, 2] {REGION_TOKEN}"
    out = processor([img], [[("USER", question), ("ASSISTANT", None)]], [regions], return_labels=False)
    assert "labels" not in out
    masks = out["region_masks"][0]
    assert torch.equal(masks[0], torch.from_numpy(scribble).T)
    assert masks[1][30, 2] and masks[1].sum() == 7 * 8  # x 25..31, y 0..7: clipped at the edges
    assert torch.equal(masks[2], ready)


def test_processor_errors(processor):
    img = Image.new("RGB", (32, 24))
    conv = [("USER", f"What is [1, 2] {REGION_TOKEN}?"), ("ASSISTANT", None)]
    with pytest.raises(ValueError, match=r"1 <region_fea> token\(s\) but 0 region\(s\)"):
        processor([img], [conv], [[]])
    with pytest.raises(ValueError, match=r"1 <region_fea> token\(s\) but 2 region\(s\)"):
        processor([img], [conv], [[Point(1, 1), Point(2, 2)]])
    with pytest.raises(ValueError, match="2 images but 1 conversations"):
        processor([img, img], [conv], [[Point(1, 1)]])
    with pytest.raises(ValueError, match="one <image> placeholder"):
        processor([img], [[("USER", "<image> <image> hi"), ("ASSISTANT", None)]])
    with pytest.raises(ValueError, match=r"expected \(W, H\) = \(32, 24\)"):
        processor([img], [conv], [[torch.zeros((24, 32), dtype=torch.bool)]])
    with pytest.raises(ValueError, match="outside"):
        processor([img], [conv], [[Point(99, 1)]])
    with pytest.raises(ImageLoadError):
        processor([b"garbage"], [conv], [[Point(1, 1)]])


def test_processor_truncation_drops_masks_of_dropped_regions(processor, tiny_tokenizer):
    img = Image.new("RGB", (32, 24))
    regions = [Point(3, 3), Point(20, 20)]
    question = build_question("Compare <region> with <region> please.", regions, 32, 24)
    conv = [("USER", question), ("ASSISTANT", "They differ.")]
    full = processor([img], [conv], [regions])
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    second = full["input_ids"][0].tolist().index(region_id, full["input_ids"][0].tolist().index(region_id) + 1)
    out = processor([img], [conv], [regions], max_length=second - 2)
    assert (out["input_ids"][0] == region_id).sum() == 1
    assert len(out["region_masks"][0]) == 1
    assert torch.equal(out["region_masks"][0][0], region_mask(regions[0], 32, 24))


def test_post_process_generation(processor):
    found = processor.post_process_generation("A dog [100, 200, 500, 600] runs.", (640, 480))
    assert len(found) == 1 and found[0].phrase == "A dog"
    assert found[0].box == pytest.approx((64.0, 96.0, 320.0, 288.0))


def test_processor_save_and_load(processor, tmp_path, tiny_tokenizer):
    processor.save_pretrained(tmp_path / "proc")
    loaded = FerretProcessor.from_pretrained(tmp_path / "proc")
    img = Image.new("RGB", (32, 24), (1, 2, 3))
    conv = [("USER", "Hi"), ("ASSISTANT", "Hello.")]
    a, b = processor([img], [conv]), loaded([img], [conv])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.allclose(a["pixel_values"], b["pixel_values"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FerretProcessor.from_pretrained(tmp_path / "missing")


def test_processor_needs_region_token():
    class Stock:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(ValueError, match="no <region_fea> token"):
        FerretProcessor(Stock())


# ---------------------------------------------------------------------------------------------
# shipped sample images


def test_sample_images_match_their_documented_boxes():
    scenes = json.loads((EXAMPLES / "examples.json").read_text())
    readme = (EXAMPLES / "README.md").read_text()
    assert len(scenes) >= 2
    for scene in scenes:
        path = EXAMPLES / scene["file"]
        assert path.stat().st_size < 60_000
        image = load_image(path)
        assert image.size == (scene["width"], scene["height"])
        assert scene["file"] in readme
        for obj in scene["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert f"| {obj['label']} | {obj['box']} |" in readme
            # a point well inside the shape (a triangle is widest near its base)
            inside_y = y1 + 3 * (y2 - y1) // 4 if obj["label"].endswith("triangle") else (y1 + y2) // 2
            r, g, b = image.getpixel(((x1 + x2) // 2, inside_y))
            expect = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (240, 200, 20),
                      "purple": (140, 50, 170), "orange": (245, 130, 20)}[obj["colour"]]
            assert max(abs(r - expect[0]), abs(g - expect[1]), abs(b - expect[2])) < 25, (scene["file"], obj)
            # just outside the box is background, not the object's colour
            outside = image.getpixel((max(x1 - 3, 0), max(y1 - 3, 0)))
            assert max(abs(c - e) for c, e in zip(outside, expect)) > 40
