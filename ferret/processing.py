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
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ferret.constants import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, REGION_TOKEN
from ferret.conversation import (
    Conversation,
    as_conversation,
    count_region_tokens,
    tokenize_conversation,
)
from ferret.data.collate import FerretCollator
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
    "PROCESSOR_CONFIG",
    "open_first_turn_with_image",
    "post_process_generation",
]

# Refuse images above this many pixels (decompression bombs); 100 megapixels.
MAX_IMAGE_PIXELS = 100_000_000
# The placeholder ``build_question`` replaces with formatted regions.
REGION_PLACEHOLDER = "<region>"
# The file FerretProcessor.save_pretrained writes and AutoProcessor reads ("processor_class").
PROCESSOR_CONFIG = "processor_config.json"

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
    """The one encoder of a sample (an image, a conversation, its regions) into model inputs.

    Chat (and so the server and the eval tasks) and the training dataset all encode through
    ``encode``; batching and padding are FerretCollator's alone (``__call__`` is ``encode`` per
    sample followed by the collator). One behaviour for every caller:

    * ``<image>\\n`` opens the first user turn when there is an image: added when the text has no
      placeholder, moved there from wherever the text put its one placeholder (released
      ``preprocess_multimodal``); two placeholders, or one without an image, raise ValueError.
    * One region per ``<region_fea>`` token, in text order: a Point / Box / FreeForm (its mask is
      built here) or a ready (W, H) mask. A count mismatch raises ValueError, before truncation.
    * ``max_length`` truncates from the end without splitting a region reference (see
      ``tokenize_conversation``); the masks of the dropped references are dropped with them.
    * Padding: the tokenizer's pad token, right side, in FerretCollator; a tokenizer without one
      is refused there (``ferret.model.builder.load_tokenizer`` gives released tokenizers
      ``<unk>`` as pad, as released).
    """

    def __init__(self, tokenizer, image_processor=None, max_length: int | None = None):
        region_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
        if region_id in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {REGION_TOKEN} token (see ferret.data.synthetic_tokenizer.add_ferret_tokens)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor if image_processor is not None else build_image_processor()
        self.max_length = max_length
        self.region_token_id = int(region_id)

    def encode(
        self,
        image: ImageSource | None,
        conversation: Union[Conversation, Sequence],
        regions: Sequence[Union[Region, torch.Tensor]] = (),
        *,
        return_labels: bool = True,
        max_length: int | None = None,
        check_length: Callable[[int], None] | None = None,
    ) -> dict:
        """One sample -> ``input_ids`` [L], ``labels`` [L] (when ``return_labels``), ``pixel_values``
        [3, S, S] (None without an image), ``region_masks`` (list of (W, H) bool) and ``image_size``
        ((W, H), None without an image). Nothing is padded.

        ``check_length(number of tokens)`` runs before any region mask is built (a mask costs one
        byte per image pixel): a caller refuses a sample too long for its model by raising there.
        """
        picture = load_image(image) if image is not None else None
        conv = as_conversation(conversation).copy()
        conv.messages = [list(m) for m in open_first_turn_with_image(conv.messages, picture is not None)]
        regions = list(regions)
        n_tokens = sum(count_region_tokens(text or "") for _, text in conv.messages)
        if n_tokens != len(regions):
            raise ValueError(
                f"the conversation has {n_tokens} {REGION_TOKEN} token(s) but {len(regions)} region(s) were given"
            )
        if regions and picture is None:
            raise ValueError("regions need an image")
        max_length = max_length if max_length is not None else self.max_length
        ids, labels = tokenize_conversation(conv, self.tokenizer, max_length=max_length)
        if check_length is not None:
            check_length(len(ids))
        kept = int((ids == self.region_token_id).sum())  # truncation drops whole region references
        size = picture.size if picture is not None else None
        sample = {
            "input_ids": ids,
            "region_masks": [_region_to_mask(region, *size) for region in regions[:kept]],
            "pixel_values": preprocess_images([picture], self.image_processor)[0] if picture is not None else None,
            "image_size": size,
        }
        if return_labels:
            sample["labels"] = labels
        return sample

    def __call__(
        self,
        images: Sequence[ImageSource | None],
        conversations: Sequence[Union[Conversation, Sequence]],
        regions: Sequence[Sequence[Union[Region, torch.Tensor]]] | None = None,
        *,
        return_labels: bool = True,
        max_length: int | None = None,
    ) -> dict:
        """A padded batch: ``input_ids``, ``attention_mask`` (bool), ``labels`` (when
        ``return_labels``) [B, L], ``pixel_values`` [N, 3, S, S] (the samples that have an image),
        ``region_masks`` (per sample) and ``image_sizes`` (per sample, (W, H) or None)."""
        images, conversations = list(images), list(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"got {len(images)} images but {len(conversations)} conversations")
        if not images:
            raise ValueError("empty batch")
        regions = [[] for _ in images] if regions is None else [list(r) for r in regions]
        if len(regions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(regions)} region lists")
        samples = []
        for index, (image, conversation, sample_regions) in enumerate(zip(images, conversations, regions)):
            try:
                samples.append(self.encode(image, conversation, sample_regions,
                                           return_labels=return_labels, max_length=max_length))
            except ValueError as error:
                error.add_note(f"(sample {index} of the batch)")
                raise
        batch = FerretCollator(self.tokenizer.pad_token_id)(samples)
        keys = ("input_ids", "attention_mask", "labels", "pixel_values", "region_masks", "image_sizes")
        return {key: batch[key] for key in keys if key in batch}

    def build_question(self, question: str, regions: Sequence[Region], width: int, height: int) -> str:
        return build_question(question, regions, width, height)

    def post_process_generation(self, text: str, image_size: tuple[int, int]) -> list[GroundedRegion]:
        """The phrases of generated text with their boxes (or points) in pixels of an image of
        ``image_size = (width, height)``; see ``post_process_generation``."""
        return post_process_generation(text, image_size)

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        """Tokenizer, image processor and ``processor_config.json`` (which AutoProcessor reads)."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(save_dir))
        self.image_processor.save_pretrained(str(save_dir))
        config = {"processor_class": type(self).__name__, "max_length": self.max_length}
        (save_dir / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int | None = None, **hub_options) -> "FerretProcessor":
        """Load a folder ``save_pretrained`` wrote (or a model folder with tokenizer and
        preprocessor files). ``hub_options`` (what AutoProcessor passes: revision, ...) are
        accepted and unused: nothing is downloaded."""
        from transformers import AutoTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"processor folder {os.fspath(path)!r} does not exist")
        if max_length is None and (folder / PROCESSOR_CONFIG).is_file():
            max_length = json.loads((folder / PROCESSOR_CONFIG).read_text()).get("max_length")
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        image_processor = CLIPImageProcessorPil.from_pretrained(str(folder))
        return cls(tokenizer, image_processor, max_length=max_length)


def post_process_generation(text: str, image_size: tuple[int, int]) -> list[GroundedRegion]:
    """Kosmos-2-style post-processing: each box or point in generated text with the phrase it
    names, in pixels of an image of ``image_size = (width, height)`` (0-999 grid numbers are
    clamped, swapped corners reordered; groups with nothing but punctuation between them share a
    phrase). Pure; never raises on the text, only on a bad image size."""
    width, height = image_size
    return parse_grounding(text, width, height)


def open_first_turn_with_image(messages: Sequence[Sequence], with_image: bool = True) -> list[tuple]:
    """(role, text) messages with ``<image>\\n`` opening the first user turn, wherever the text put
    the placeholder (released behaviour: a turn that held it loses it and its surrounding
    whitespace). Messages already opened that way come back as they are. More than one
    placeholder, or one without an image (``with_image=False``), is a ValueError."""
    messages = [tuple(message) for message in messages]
    count = sum((text or "").count(IMAGE_TOKEN) for _, text in messages)
    if count > 1:
        raise ValueError(f"a conversation may hold one {IMAGE_TOKEN} placeholder, found {count}")
    if not with_image:
        if count:
            raise ValueError(f"the text holds {IMAGE_TOKEN} but there is no image")
        return messages
    if count == 1 and (messages[0][1] or "").startswith(IMAGE_TOKEN + "\n"):
        return messages
    messages = [(role, text.replace(IMAGE_TOKEN, "").strip() if text and IMAGE_TOKEN in text else text)
                for role, text in messages]
    role, text = messages[0]
    messages[0] = (role, f"{IMAGE_TOKEN}\n{text}")
    return messages


def _region_to_mask(region, width: int, height: int) -> torch.Tensor:
    if isinstance(region, torch.Tensor):
        if tuple(region.shape) != (width, height):
            raise ValueError(f"a region mask has shape {tuple(region.shape)}; expected (W, H) = ({width}, {height})")
        return region.bool()
    return region_mask(region, width, height)
