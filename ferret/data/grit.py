"""GRIT-format instruction data: loading, validation, mixing, and the training Dataset.

The json format is the released Ferret training format (a list of samples):

    image          image file, relative to the image folder (default: the json's folder)
    image_w/h      raw image size in pixels
    conversations  [{"from": "human" | "gpt", "value": text}, ...], human first, alternating;
                   region mentions are placeholders <bbox_location{i}>, i indexing that turn's boxes
    box_x1y1x2y2   one list of [x1, y1, x2, y2] pixel boxes per turn (x2, y2 inclusive)
    masks          optional, per turn and box: COCO RLE {"size": [H, W], "counts": str} or null
    location_instruction, dataset   as released (samples without boxes need neither)

Extensions (written by ferret.data.synthetic, optional everywhere):

    region_format  per turn: null (human turns: point or box at random, as released), "point",
                   "box" or "free_form" (human turns only)
    scribbles      per turn and box: COCO RLE of a free-form scribble, required for a
                   "free_form" turn; the prompt shows the scribble's box and its region mask is
                   the scribble.
    task, subtask, id, scene_id   carried through untouched.

Rendering a sample (released `LazySupervisedDataset.__getitem__` behaviour):
* human turns: every placeholder becomes `[x, y] <region_fea>` or `[x1, y1, x2, y2] <region_fea>`
  on the 0-999 grid and adds one region mask (W, H) per region token, in text order; an object
  mentioned twice in one human turn gets the same point;
* assistant turns: plain boxes, except that an object the preceding human turn referred to by
  a point is echoed with that point (released `point_box_cache`);
* boxes are clamped into the image (released `regulate_box`).

Randomness comes from `numpy.random.default_rng([seed, epoch, index])`, so a resumed run (same
seed, `set_epoch`) sees the same points and formats. Bad samples are skipped and counted by
reason in `dataset.skipped`; a malformed json file raises DataFormatError naming the position.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ferret.constants import IMAGE_TOKEN
from ferret.data.errors import DataFormatError, SampleError, read_json
from ferret.data.points import check_strategy, sample_point
from ferret.data.rle import decode_rle, rle_size
from ferret.processing import FerretProcessor, open_first_turn_with_image, preprocess_images
from ferret.regions import Box, FreeForm, Point, RegionError, clip_box, format_region, region_mask

logger = logging.getLogger(__name__)

PLACEHOLDER_RE = re.compile(r"<bbox_location(\d+)>")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
REGION_FORMATS = (None, "point", "box", "free_form")


@dataclass(frozen=True)
class GritDataConfig:
    """How samples are rendered (names follow the released DataArguments/ModelArguments)."""

    point_strategy: str = "segment_mask|uniform"  # released `point_input_sample`
    add_region_feature: bool = True  # human regions carry <region_fea> and produce masks
    refer_previous_point: bool = True  # one point per object per human turn (and echo it)
    max_length: int | None = None  # token limit (None: no truncation)
    seed: int = 0
    check_images: bool = True  # check at load time that every image file exists

    def __post_init__(self) -> None:
        check_strategy(self.point_strategy)
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}")


@dataclass(frozen=True)
class DataSource:
    """One json file of the mix; `multiple` as the released `data_multiple` (None: as is)."""

    path: str
    image_folder: str | None = None
    multiple: float | None = None


@dataclass
class RenderedSample:
    """A sample with its placeholders resolved: text turns and the region masks they refer to."""

    messages: list[tuple[str, str]]  # (role "USER" | "ASSISTANT", text)
    region_masks: list[torch.Tensor]  # (W, H) bool, one per <region_fea> in text order
    regions: list[Any]  # Point / Box / FreeForm behind each region mask


# ---------------------------------------------------------------- validation


def _check_box(raw: Any, width: int, height: int) -> Box:
    """A json box -> clamped pixel Box; out of the image or malformed -> SampleError."""
    if not (isinstance(raw, (list, tuple)) and len(raw) == 4):
        raise SampleError("bad_box", f"box must be [x1, y1, x2, y2], got {raw!r}")
    try:
        return clip_box(Box(*raw), width, height)
    except RegionError as err:
        reason = "box_outside_image" if "outside" in str(err) else "bad_box"
        raise SampleError(reason, str(err)) from err


def _per_turn(sample: dict, key: str, n_turns: int) -> list | None:
    value = sample.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n_turns:
        raise SampleError("bad_structure", f"'{key}' must hold one entry per turn ({n_turns} turns)")
    return value


def validate_sample(sample: Any, check_image: bool = True) -> None:
    """Raise SampleError (with a skip reason) when a sample cannot be rendered."""
    if not isinstance(sample, dict):
        raise SampleError("bad_structure", f"sample must be a json object, got {type(sample).__name__}")
    conversations = sample.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("bad_structure", "sample has no 'conversations' list")
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleError("bad_structure", f"turn {t} must be {{'from': ..., 'value': str}}")
        if not turn["value"].strip():
            raise SampleError("bad_structure", f"turn {t} has no text")
        expected = "human" if t % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise SampleError("bad_structure", f"turn {t} is from {turn.get('from')!r}, expected {expected!r}")
    if "image" not in sample and any(IMAGE_TOKEN in turn["value"] for turn in conversations):
        raise SampleError("bad_structure", f"the text holds {IMAGE_TOKEN} but the sample has no image")
    if sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations) > 1:
        raise SampleError("bad_structure", f"the text holds more than one {IMAGE_TOKEN}")
    if "image" in sample:
        if not isinstance(sample["image"], str):
            raise SampleError("bad_structure", "'image' must be a file name")
        if check_image and not os.path.isfile(sample["image"]):
            raise SampleError("missing_image", f"image file not found: {sample['image']}")
    n_turns = len(conversations)
    boxes = _per_turn(sample, "box_x1y1x2y2", n_turns)
    if boxes is None:
        for t, turn in enumerate(conversations):
            if PLACEHOLDER_RE.search(turn["value"]):
                raise SampleError("placeholder_without_box", f"turn {t} has a placeholder but the sample has no boxes")
        return
    width, height = sample.get("image_w"), sample.get("image_h")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise SampleError("bad_structure", f"image_w/image_h must be positive integers, got {width!r}, {height!r}")
    masks = _per_turn(sample, "masks", n_turns)
    formats = _per_turn(sample, "region_format", n_turns)
    scribbles = _per_turn(sample, "scribbles", n_turns)
    for t, (turn, turn_boxes) in enumerate(zip(conversations, boxes)):
        if not isinstance(turn_boxes, list):
            raise SampleError("bad_structure", f"box_x1y1x2y2[{t}] must be a list of boxes")
        for raw in turn_boxes:
            _check_box(raw, width, height)
        used = {int(i) for i in PLACEHOLDER_RE.findall(turn["value"])}
        extra = sorted(i for i in used if i >= len(turn_boxes))
        if extra:
            raise SampleError("placeholder_without_box",
                              f"turn {t} mentions <bbox_location{extra[0]}> but has {len(turn_boxes)} boxes")
        missing = sorted(set(range(len(turn_boxes))) - used)
        if missing:
            raise SampleError("box_without_placeholder",
                              f"turn {t} box {missing[0]} has no <bbox_location{missing[0]}> in the text")
        if masks is not None:
            _check_turn_masks(masks[t], len(turn_boxes), t, "masks", height, width, allow_null=True)
        fmt = formats[t] if formats is not None else None
        if fmt not in REGION_FORMATS:
            raise SampleError("bad_structure", f"region_format[{t}] must be one of {REGION_FORMATS}, got {fmt!r}")
        if fmt in ("point", "free_form") and t % 2 == 1:
            raise SampleError("bad_structure", f"region_format[{t}] = {fmt!r} but assistant turns write boxes")
        if fmt == "free_form":
            if scribbles is None:
                raise SampleError("bad_structure", f"turn {t} is free_form but the sample has no 'scribbles'")
            _check_turn_masks(scribbles[t], len(turn_boxes), t, "scribbles", height, width, allow_null=False)


def _check_turn_masks(entries: Any, n_boxes: int, turn: int, key: str, height: int, width: int,
                      allow_null: bool) -> None:
    if not isinstance(entries, list) or len(entries) != n_boxes:
        raise SampleError("bad_structure", f"{key}[{turn}] must hold one entry per box ({n_boxes})")
    for rle in entries:
        if rle is None and allow_null:
            continue
        if rle_size(rle) != (height, width):
            raise SampleError("mask_size_mismatch",
                              f"{key}[{turn}] RLE size {rle_size(rle)} differs from the image (h, w) {(height, width)}")


# ---------------------------------------------------------------- loading and mixing


def load_grit_file(path: str, image_folder: str | None = None, check_images: bool = True,
                   skipped: Counter | None = None) -> list[dict]:
    """Read one json file; invalid samples are logged, counted in `skipped` and left out."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a json list of samples, got {type(data).__name__}")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    skipped = skipped if skipped is not None else Counter()
    kept = []
    for index, sample in enumerate(data):
        if isinstance(sample, dict) and isinstance(sample.get("image"), str):
            sample = dict(sample, image=os.path.join(folder, sample["image"]))
        try:
            validate_sample(sample, check_image=check_images)
        except SampleError as err:
            skipped[err.reason] += 1
            logger.warning("skipping sample %d of %s: %s", index, path, err)
            continue
        kept.append(sample)
    return kept


def extend_by_multiple(samples: list, multiple: float, rng: np.random.Generator) -> list:
    """Released `extend_list`: floor(m) full copies plus ceil(n * frac(m)) random picks."""
    if multiple < 0 or not math.isfinite(multiple):
        raise ValueError(f"data multiple must be a finite non-negative number, got {multiple}")
    whole = math.floor(multiple)
    extra = math.ceil(len(samples) * (multiple - whole))
    picks = rng.integers(0, len(samples), size=extra) if samples and extra else []
    return samples * whole + [samples[int(k)] for k in picks]


def mix_sources(sources: Sequence[DataSource], seed: int = 0, check_images: bool = True,
                skipped: Counter | None = None) -> list[dict]:
    """Load every source, apply its multiple, and shuffle the union with a seeded generator."""
    if not sources:
        raise ValueError("no data sources given")
    rng = np.random.default_rng([seed, 7])
    mixed: list[dict] = []
    for source in sources:
        samples = load_grit_file(source.path, source.image_folder, check_images, skipped)
        if source.multiple is not None:
            samples = extend_by_multiple(samples, source.multiple, rng)
        logger.info("data source %s: %d samples", source.path, len(samples))
        mixed.extend(samples)
    order = rng.permutation(len(mixed))
    return [mixed[int(k)] for k in order]


# ---------------------------------------------------------------- rendering




def render_sample(sample: dict, rng: np.random.Generator, config: GritDataConfig = GritDataConfig()) -> RenderedSample:
    """Resolve the placeholders of a validated sample into text and region masks."""
    conversations = sample["conversations"]
    box_lists = sample.get("box_x1y1x2y2")
    messages: list[tuple[str, str]] = []
    region_masks: list[torch.Tensor] = []
    regions: list[Any] = []
    if box_lists is None:
        messages = [(ROLES[turn["from"]], turn["value"]) for turn in conversations]
        if "image" in sample:
            messages = open_first_turn_with_image(messages)
        return RenderedSample(messages, region_masks, regions)

    width, height = sample["image_w"], sample["image_h"]
    masks = sample.get("masks")
    formats = sample.get("region_format") or [None] * len(conversations)
    scribbles = sample.get("scribbles")
    point_cache: dict[tuple, Point] = {}
    for t, turn in enumerate(conversations):
        human = t % 2 == 0
        boxes = [_check_box(raw, width, height) for raw in box_lists[t]]
        if human and config.refer_previous_point:
            point_cache = {}
        if not boxes:
            messages.append((ROLES[turn["from"]], turn["value"]))
            continue
        fmt = formats[t]
        if fmt is None:
            fmt = str(rng.choice(["point", "box"])) if human else "box"

        def segment(k: int) -> np.ndarray | None:
            if masks is None or masks[t][k] is None:
                return None
            return decode_rle(masks[t][k], (height, width))

        # One region per box index, resolved in index order so randomness is reproducible.
        turn_regions: list[tuple[Any, np.ndarray | None, Box]] = []
        for k, box in enumerate(boxes):
            key = box.coords
            seg = segment(k)
            if fmt == "free_form":
                # The scribble is the region itself (it is drawn on the object), not cut by the segment.
                region, seg = FreeForm(decode_rle(scribbles[t][k], (height, width))), None
            elif key in point_cache:
                region = point_cache[key]
            elif fmt == "point":
                x, y = sample_point(config.point_strategy, key, seg, rng)
                region = Point(min(x, width - 1), min(y, height - 1))
                if config.refer_previous_point:
                    point_cache[key] = region
            else:
                region = box
            turn_regions.append((region, seg, box))

        with_token = human and config.add_region_feature

        def substitute(match: re.Match) -> str:
            region, seg, box = turn_regions[int(match.group(1))]
            if with_token:
                try:
                    region_masks.append(region_mask(region, width, height, segment=seg, box=box))
                except RegionError as err:
                    raise SampleError("bad_region", str(err)) from err
                regions.append(region)
            return format_region(region, width, height, with_token=with_token)

        messages.append((ROLES[turn["from"]], PLACEHOLDER_RE.sub(substitute, turn["value"])))
    if "image" in sample:
        messages = open_first_turn_with_image(messages)
    return RenderedSample(messages, region_masks, regions)


# ---------------------------------------------------------------- dataset


class GritDataset(Dataset):
    """Lazy GRIT/LLaVA-format dataset.

    Items: input_ids, labels (LongTensor), pixel_values (3, S, S), region_masks (list of (W, H)
    bool), image_size (W, H), skipped (reasons of bad samples passed over to reach this item),
    sample_index (the sample it was built from), plus `task` when the sample names one. Call `set_epoch(e)` before
    each epoch (and before building DataLoader workers) to vary points/formats reproducibly.
    """

    def __init__(self, samples: list[dict], tokenizer, image_processor, config: GritDataConfig = GritDataConfig(),
                 skipped: Counter | None = None, max_fallbacks: int = 16):
        if not samples:
            raise ValueError("GritDataset got no usable samples (see the skipped counts in the log)")
        self.samples = samples
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.skipped: Counter = skipped if skipped is not None else Counter()
        self.max_fallbacks = max_fallbacks
        self.epoch = 0
        self._blank: torch.Tensor | None = None
        # The one per-sample encoder (shared with chat): text, image and region masks -> model inputs.
        self.processor = FerretProcessor(tokenizer, image_processor, max_length=config.max_length)

    @classmethod
    def from_sources(cls, sources: Sequence[DataSource], tokenizer, image_processor,
                     config: GritDataConfig = GritDataConfig()) -> "GritDataset":
        skipped: Counter = Counter()
        samples = mix_sources(sources, config.seed, config.check_images, skipped)
        if sum(skipped.values()):
            logger.warning("skipped %d samples at load time: %s", sum(skipped.values()), dict(skipped))
        return cls(samples, tokenizer, image_processor, config, skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rough_lengths(self) -> list[int]:
        """A cheap token count per sample, for length-grouped batches: its words, a box's numbers
        for each region placeholder, a few template tokens per turn (no tokenizer, no image)."""
        return [sum(len(turn["value"].split()) + 8 * len(PLACEHOLDER_RE.findall(turn["value"])) + 4
                    for turn in sample["conversations"]) for sample in self.samples]

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict:
        # A sample that only fails once opened (corrupt image, wrong size) is replaced by the
        # next one, so a long run does not die on one bad file. The item lists what it skipped
        # (`skipped`): DataLoader workers hold copies of the dataset, so their counts reach the
        # training loop only through the batches (FerretCollator sums them).
        reasons: list[str] = []
        for step in range(self.max_fallbacks):
            current = (index + step) % len(self.samples)
            try:
                item = self.build_item(current)
            except SampleError as err:
                self.skipped[err.reason] += 1
                reasons.append(err.reason)
                logger.warning("skipping sample %d (%s); %d skipped so far", current, err, sum(self.skipped.values()))
                continue
            item["skipped"] = reasons
            item["sample_index"] = current
            return item
        raise SampleError("too_many_bad_samples", f"{self.max_fallbacks} consecutive samples from {index} failed")

    def skip_report(self) -> str:
        """One line with the skip counts by reason (load time + this process's run time); logged."""
        total = sum(self.skipped.values())
        line = f"skipped {total} samples" + (f": {dict(sorted(self.skipped.items()))}" if total else "")
        if total:
            logger.warning(line)
        else:
            logger.info(line)
        return line

    def _blank_pixels(self) -> torch.Tensor:
        if self._blank is None:
            from PIL import Image

            self._blank = torch.zeros_like(preprocess_images([Image.new("RGB", (8, 8))], self.image_processor)[0])
        return self._blank

    def build_item(self, index: int) -> dict:
        from ferret.processing import ImageLoadError, load_image

        sample = self.samples[index]
        rng = self.rng_for(index)
        image = None
        if "image" in sample:
            try:
                image = load_image(sample["image"])
            except (ImageLoadError, FileNotFoundError) as err:
                raise SampleError("bad_image", str(err)) from err
            if "image_w" in sample and (sample["image_w"], sample["image_h"]) != image.size:
                raise SampleError("image_size_mismatch",
                                  f"{sample['image']} is {image.size[0]}x{image.size[1]}, the sample says "
                                  f"{sample['image_w']}x{sample['image_h']}")
        rendered = render_sample(sample, rng, self.config)
        try:
            item = self.processor.encode(image, rendered.messages, rendered.region_masks)
        except ValueError as err:  # e.g. <region_fea> written in the source text: no mask for it
            raise SampleError("unencodable", str(err)) from err
        if item["pixel_values"] is None:  # text-only sample in a multimodal batch: a blank image, as released
            item["pixel_values"] = self._blank_pixels()
        if "task" in sample:
            item["task"] = sample["task"]
        return item
