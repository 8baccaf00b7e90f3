"""Image loading, the CLIP image processor configured for Ferret, and ``FerretProcessor``.

Image policy (``load_image``):

* EXIF orientation is applied, so regions are in the coordinates a viewer shows.
* Transparency (RGBA, LA, PA, P with a transparent colour) is composited on white: dropping
  alpha would expose whatever colour the fully transparent pixels happen to store (often black).
* 16/32-bit grayscale (I;16, I) is scaled to 8 bits by its nominal range, not clipped.
* Corrupt, truncated, empty, zero-size or missing files and images over ``MAX_IMAGE_PIXELS``
  raise ``ImageLoadError`` (``ImageNotFoundError`` for a missing file) naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ferret.constants import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGE_TOKEN, REGION_TOKEN
from ferret.conversation import (
    Conversation,
    as_conversation,
    count_region_tokens,
    tokenize_conversation,
)
from ferret.regions import GroundedRegion, Region, format_region, parse_grounding, region_mask

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "ImageNotFoundError",
    "load_image",
    "build_image_processor",
    "preprocess_images",
    "build_question",
    "FerretProcessor",
    "REGION_PLACEHOLDER",
]

# Refuse images above this many pixels (decompression bombs); 100 megapixels.
MAX_IMAGE_PIXELS = 100_000_000
# The placeholder ``build_question`` replaces with formatted regions.
REGION_PLACEHOLDER = "<region>"

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class ImageLoadError(ValueError):
    """An image could not be read: corrupt, truncated, empty, too large or unsupported."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The image file does not exist."""


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"image file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    return "image"


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or values.max(initial=0) > 255) else 255.0
        values = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(values, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageLoadError(f"cannot convert {name} from mode {mode} to RGB: {err}") from err


def load_image(src: ImageSource) -> Image.Image:
    """Open an image from a path, bytes or a PIL image as an upright RGB ``PIL.Image``."""
    name = _describe(src)
    if isinstance(src, Image.Image):
        image = src
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageNotFoundError(f"{name} does not exist (or is not a file)")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{name} is empty (0 bytes)")
        image = None
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageLoadError("image bytes are empty")
        image = None
    else:
        raise ImageLoadError(f"cannot load an image from {type(src).__name__}; give a path, bytes or a PIL image")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if image is None:
                opened = Image.open(io.BytesIO(bytes(src)) if not isinstance(src, (str, os.PathLike)) else src)
            else:
                opened = image
            width, height = opened.size
            if width <= 0 or height <= 0:
                raise ImageLoadError(f"{name} has zero size ({width}x{height})")
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageLoadError(
                    f"{name} is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                    f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (possible decompression bomb)"
                )
            opened.load()  # decode now: truncated/corrupt data fails here, not later
        except ImageLoadError:
            raise
        except UnidentifiedImageError as err:
            raise ImageLoadError(f"{name} is not a readable image (corrupt or unknown format)") from err
        except Image.DecompressionBombError as err:
            raise ImageLoadError(f"{name} is too large (possible decompression bomb): {err}") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"{name} is corrupt or truncated: {err}") from err
    try:
        upright = ImageOps.exif_transpose(opened)
    except Exception as err:  # a damaged EXIF block should not make the pixels unusable
        warnings.warn(f"ignoring unreadable EXIF orientation of {name}: {err}", stacklevel=2)
        upright = opened
    return _to_rgb(upright if upright is not None else opened, name)


def build_image_processor(image_size: int = 336, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """A CLIP image processor for Ferret's ``square_nocrop``: bicubic resize straight to
    ``image_size`` x ``image_size`` (no crop, no padding), rescale by 1/255, normalise.

    Uses the PIL backend (``CLIPImageProcessorPil``), which needs no torchvision.
    """
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std}")
    square = {"height": image_size, "width": image_size}
    return CLIPImageProcessorPil(
        size=square,
        crop_size=square,
        do_resize=True,
        do_center_crop=False,
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def preprocess_images(images: Sequence[ImageSource], image_processor) -> torch.FloatTensor:
    """Images (paths, bytes or PIL) -> pixel values [B, 3, S, S] (float32)."""
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    images = [load_image(im) for im in images]
    if not images:
        raise ValueError("no images given")
    return image_processor(images, return_tensors="pt")["pixel_values"].float()


def build_question(question: str, regions: Sequence[Region], width: int, height: int) -> str:
    """Write regions into a user question.

    Each literal ``<region>`` placeholder is replaced, in order, by ``format_region(...)``
    (``"[x1, y1, x2, y2] <region_fea>"``). Without placeholders the formatted regions are appended
    after the question, separated by spaces. A placeholder/region count mismatch raises ValueError.
    """
    regions = list(regions)
    formatted = [format_region(r, width, height) for r in regions]
    n_placeholders = question.count(REGION_PLACEHOLDER)
    if n_placeholders == 0:
        return " ".join([question, *formatted]) if formatted else question
    if n_placeholders != len(regions):
        raise ValueError(
            f"question has {n_placeholders} {REGION_PLACEHOLDER} placeholder(s) but "
            f"{len(regions)} region(s) were given"
        )
    pieces = question.split(REGION_PLACEHOLDER)
    out = [pieces[0]]
    for text, piece in zip(formatted, pieces[1:]):
        out += [text, piece]
    return "".join(out)


class FerretProcessor:
    """Turns (image, conversation, regions) samples into model inputs (llava/kosmos2 style).

    ``__call__`` returns a dict with ``input_ids`` [B, L] (right-padded with the tokenizer's pad
    id), ``attention_mask`` [B, L], ``labels`` [B, L] (when ``return_labels``), ``pixel_values``
    [B, 3, S, S], ``region_masks`` (per sample, a list of (W, H) bool masks in the order of the
    ``<region_fea>`` tokens) and ``image_sizes`` (per sample, the raw ``(width, height)``).
    """

    def __init__(self, tokenizer, image_processor=None, max_length: int | None = None):
        if tokenizer.convert_tokens_to_ids(REGION_TOKEN) in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {REGION_TOKEN} token "
                             "(see ferret.data.synthetic_tokenizer.add_ferret_tokens)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor if image_processor is not None else build_image_processor()
        self.max_length = max_length

    def __call__(
        self,
        images: Sequence[ImageSource],
        conversations: Sequence[Union[Conversation, Sequence]],
        regions: Sequence[Sequence[Union[Region, torch.Tensor]]] | None = None,
        *,
        return_labels: bool = True,
        max_length: int | None = None,
    ) -> dict:
        images, conversations = list(images), list(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"got {len(images)} images but {len(conversations)} conversations")
        if not images:
            raise ValueError("empty batch")
        regions = [[] for _ in images] if regions is None else [list(r) for r in regions]
        if len(regions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(regions)} region lists")
        max_length = max_length if max_length is not None else self.max_length

        pil_images = [load_image(im) for im in images]
        ids_list, labels_list, masks_list, sizes = [], [], [], []
        for idx, (image, conv, sample_regions) in enumerate(zip(pil_images, conversations, regions)):
            width, height = image.size
            conv = _with_image_placeholder(as_conversation(conv).copy())
            n_tokens = sum(count_region_tokens(text or "") for _, text in conv.messages)
            if n_tokens != len(sample_regions):
                raise ValueError(
                    f"sample {idx}: the conversation has {n_tokens} {REGION_TOKEN} token(s) but "
                    f"{len(sample_regions)} region(s) were given"
                )
            masks = [_region_to_mask(r, width, height, idx) for r in sample_regions]
            ids, labels = tokenize_conversation(conv, self.tokenizer, max_length=max_length)
            region_id = self.tokenizer.convert_tokens_to_ids(REGION_TOKEN)
            # Truncation drops whole region references from the end; drop their masks too.
            masks = masks[: int((ids == region_id).sum())]
            ids_list.append(ids)
            labels_list.append(labels)
            masks_list.append(masks)
            sizes.append((width, height))

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        length = max(len(ids) for ids in ids_list)
        input_ids = torch.full((len(ids_list), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids_list), length), dtype=torch.long)
        labels = torch.full((len(ids_list), length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, lab) in enumerate(zip(ids_list, labels_list)):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(lab)] = lab
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": preprocess_images(pil_images, self.image_processor),
            "region_masks": masks_list,
            "image_sizes": sizes,
        }
        if return_labels:
            out["labels"] = labels
        return out

    def build_question(self, question: str, regions: Sequence[Region], width: int, height: int) -> str:
        return build_question(question, regions, width, height)

    def post_process_generation(self, text: str, image_size: tuple[int, int]) -> list[GroundedRegion]:
        """Boxes/points in generated text, in pixels of an image of ``image_size = (width, height)``."""
        width, height = image_size
        return parse_grounding(text, width, height)

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(save_dir))
        self.image_processor.save_pretrained(str(save_dir))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "FerretProcessor":
        from transformers import AutoTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        if not Path(path).is_dir():
            raise FileNotFoundError(f"processor folder {os.fspath(path)!r} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        image_processor = CLIPImageProcessorPil.from_pretrained(str(path))
        return cls(tokenizer, image_processor, **kwargs)


def _with_image_placeholder(conv: Conversation) -> Conversation:
    """Ferret prompts carry exactly one ``<image>``, opening the first user turn."""
    count = sum((text or "").count(IMAGE_TOKEN) for _, text in conv.messages)
    if count > 1:
        raise ValueError(f"a conversation may hold one {IMAGE_TOKEN} placeholder, found {count}")
    if count == 0:
        role, text = conv.messages[0]
        conv.messages[0] = [role, IMAGE_TOKEN + "\n" + text]
    return conv


def _region_to_mask(region, width: int, height: int, idx: int) -> torch.Tensor:
    if isinstance(region, torch.Tensor):
        if tuple(region.shape) != (width, height):
            raise ValueError(
                f"sample {idx}: a region mask has shape {tuple(region.shape)}; expected (W, H) = ({width}, {height})"
            )
        return region.bool()
    return region_mask(region, width, height)
