"""A synthetic GRIT world: coloured shapes on textured backgrounds, written as GRIT-format json.

    python -m ferret.data.synthetic --out data/synth --n 20000 --seed 0

Each scene is one PNG with 2-5 objects (colour x shape x size), drawn back to front so later
objects occlude earlier ones; every object's mask is its VISIBLE pixels and its box is the
tight box of that mask (inclusive pixel corners, as in the released GRIT json). Several
samples (question/answer pairs of different task families) share a scene. Half of the
grounding, listing, naming and all yes/no questions use the released benchmark wordings
(RefCOCO, Flickr30k, LVIS, POPE), so the benchmark scorers in ferret.eval parse the answers. Everything follows
from the seed: one generator per scene, seeded with (seed, scene_id), so the output does not
depend on how scenes are split across worker processes.

Sample json (released GRIT fields, plus the extensions marked *):
    image, image_w, image_h, dataset, location_instruction, conversations,
    box_x1y1x2y2  one list of [x1, y1, x2, y2] pixel boxes per turn,
    masks         COCO RLE of each box's visible object mask, per turn and box,
    *id, *scene_id, *task (family), *subtask,
    *region_format  optional, per turn: null (the loader picks point or box at random, as the
                    released code does), "point", "box" or "free_form",
    *scribbles      with free_form turns: per turn and box, the RLE of a scribble drawn on the
                    object; the prompt then shows the scribble's box and the region mask is the
                    scribble (see ferret.data.grit).
Every split's scenes are also exported as plain records (scenes_train.json, scenes_val.json,
scenes_test.json): each object's name, colour, shape, size class, box, visible-area mask RLE.
Evaluation scores against them; training reads them for the dense readout loss.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ferret.constants import IMAGE_TOKEN
from ferret.data.rle import encode_rle

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 195),
    "orange": (245, 140, 30),
    "pink": (240, 120, 195),
    "cyan": (40, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
# Radius as a fraction of the shorter image side; the classes are separated by gaps so the
# size attribute is learnable.
SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "small": (0.08, 0.11),
    "medium": (0.13, 0.17),
    "large": (0.20, 0.26),
}
# "negative" (yes/no) was 0.18 before session 12: at 0.30 the same recipe says "No" to 0.72 of absent
# names instead of 0.01, and grounds and names as well; 0.40 since session 13, between 0.30 (better
# naming) and 0.50 (better yes/no and grounding) (MODEL_CARD.md). Earlier runs' worlds are
# `--task-weight negative=0.18` / `=0.30`.
TASK_WEIGHTS: dict[str, float] = {
    "refer_object": 0.24,
    "refer_attribute": 0.10,
    "ground": 0.24,
    "grounded_caption": 0.12,
    "relation": 0.12,
    "negative": 0.40,
}
# The released benchmark prompts (ferret/eval/{refcoco,flickr,lvis,pope}.py ask exactly these),
# so a model trained on this world can be scored by the benchmark code without a prompt shift.
REFCOCO_QUESTION = "What is the location of the {name} in the image?"
FLICKR_QUESTION = "What are the locations of {phrases}?"
LVIS_QUESTION = "Is the object <bbox_location0> of the image a {first} or a {second}?"
POPE_QUESTION = "Is there a {name} in the image?"
# Share of each family's samples asked in the benchmark wording (the rest keep the free wording).
BENCHMARK_WORDING_PROB = 0.5
DATASET_NAME = "synthetic_grit"
# Tries per scene before render_scene gives up: the default world never needs a second, 12 objects
# a canvas fit about half the time, and an impossible min_objects must fail, not loop forever.
RENDER_ATTEMPTS = 100
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SyntheticConfig:
    min_side: int = 160
    max_side: int = 320
    min_objects: int = 2
    max_objects: int = 5
    samples_per_scene: int = 5
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # Val and test are drawn from scenes 0..split_scenes-1 exactly as a world of that many scenes
    # draws them; every later scene is train. So a larger world (more training scenes) keeps a
    # smaller one's held-out splits scene for scene. 0: split all scenes.
    split_scenes: int = 0
    free_form_prob: float = 0.3
    min_visible_fraction: float = 0.5
    # Shapes are turned by a uniform angle in [-max_rotation, max_rotation] degrees. A world with any
    # angle (180) was tried in session 14 (run full_rot192, MODEL_CARD.md): it named the
    # out-of-generator set's turned triangles better but that set's shapes overall no better.
    max_rotation: float = 20.0
    # Share of non-free-form samples whose referred (human-turn) regions carry no segment mask,
    # so the region mask is the plain box (a point: its window within the box). Chat and the
    # benchmarks refer with plain boxes and points; training only on segment-cut masks would
    # never show the model a box that also holds a neighbour's pixels.
    unsegmented_region_prob: float = 0.4
    # Up to this many question/answer pairs of a scene are chained into one multi-turn sample
    # (1: every sample is single-turn). Chaining shares the image and system prompt among the
    # turns, so a small model gets several supervised answers per forward pass.
    turns_per_sample: int = 1
    # Upper bound of a per-pixel noise sigma over the whole image (objects included). Off by
    # default: noise triples PNG size and encode time, and backgrounds are textured/noisy
    # regardless. The out-of-generator set puts such noise over its objects (session 20's probe).
    pixel_noise: float = 0.0
    # Draw each object with its own proportions (SHAPE_PROPORTIONS' ranges) and anti-aliased edges
    # (VARIETY_SUPERSAMPLE), instead of one exact star, cross, ring and square with hard edges. Off by
    # default, so every existing world redraws pixel for pixel (MODEL_CARD.md, run full_variety).
    shape_variety: bool = False
    # Lower end of the "small" class's radius (a fraction of the shorter side; SIZE_CLASSES says 0.08).
    # Every image is squashed to the model's square input, so at 0.08 no object there is under ~11 px
    # in radius, while a 640x480 photo's small objects are ~7 px; 0.05 reaches them (run full_small).
    min_radius: float = SIZE_CLASSES["small"][0]
    # Share of the absent names asked about that take a present object's colour with a shape it
    # does not have there: the "No" models miss (87 of the shipped model's 92 wrong "Yes" on test).
    # None keeps the default draw (half hard: a present colour or shape; half any absent name), so
    # existing worlds redraw question for question.
    colour_negative_share: float | None = None
    # Chance that an object after the first takes the colour of one already placed (with another
    # shape): a referred object that shares its colour with another is named wrong twice as often
    # (shipped model, test boxes 0.101 against 0.052; session 44), and uniform colours give 19 % of
    # the objects such a twin. None draws as before, so existing worlds redraw pixel for pixel.
    colour_repeat_share: float | None = None
    task_weights: dict[str, float] = field(default_factory=lambda: dict(TASK_WEIGHTS))


@dataclass
class SceneObject:
    color: str
    shape: str
    size: str
    radius: float
    mask: np.ndarray  # (H, W) bool, visible pixels only
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0


@dataclass
class Scene:
    scene_id: int
    width: int
    height: int
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]

    @property
    def image_name(self) -> str:
        return f"images/scene_{self.scene_id:06d}.png"


# ---------------------------------------------------------------- drawing


def _rotated(points: np.ndarray, angle_deg: float, cx: float, cy: float) -> list[tuple[float, float]]:
    theta = math.radians(angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    moved = points @ rotation.T + np.array([cx, cy])
    return [tuple(p) for p in moved.tolist()]


# Each shape's one proportion (a fraction of its radius): the square's half side, the ring's hole,
# the star's inner radius, the cross's arm half-width. The default world draws every shape with the
# first value; `shape_variety` draws each object's from the range, which holds the first value and
# the proportions any other drawing code is likely to pick (the out-of-generator set's included).
SHAPE_PROPORTIONS: dict[str, tuple[float, tuple[float, float]]] = {
    "square": (0.85, (0.72, 0.92)),
    "ring": (0.55, (0.40, 0.68)),
    "star": (0.45, (0.34, 0.56)),
    "cross": (0.32, (0.22, 0.40)),
}
# Supersampling of `shape_variety` drawing: edges are anti-aliased, as most drawing code makes them.
VARIETY_SUPERSAMPLE = 4


def _star_points(radius: float, inner: float = SHAPE_PROPORTIONS["star"][0]) -> np.ndarray:
    angles = np.deg2rad(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, radius, inner * radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross_points(radius: float, half_width: float = SHAPE_PROPORTIONS["cross"][0]) -> np.ndarray:
    arm, half = radius, half_width * radius
    return np.array([
        (-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
        (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half),
    ])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, angle: float,
                proportion: float | None, fill: int) -> None:
    """Fill one shape into `draw` (in the canvas's own pixel units)."""
    if proportion is None and shape in SHAPE_PROPORTIONS:
        proportion = SHAPE_PROPORTIONS[shape][0]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        inner = proportion * radius
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        half = proportion * radius
        corners = np.array([(-half, -half), (half, -half), (half, half), (-half, half)])
        draw.polygon(_rotated(corners, angle, cx, cy), fill=fill)
    elif shape == "triangle":
        angles = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        corners = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
        draw.polygon(_rotated(corners, angle, cx, cy), fill=fill)
    elif shape == "star":
        draw.polygon(_rotated(_star_points(radius, proportion), angle, cx, cy), fill=fill)
    elif shape == "cross":
        draw.polygon(_rotated(_cross_points(radius, proportion), angle, cx, cy), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float,
               width: int, height: int, proportion: float | None = None) -> np.ndarray:
    """Full (unoccluded) mask of one shape, (H, W) bool. `proportion`: see SHAPE_PROPORTIONS."""
    canvas = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, radius, angle, proportion, fill=1)
    return np.asarray(canvas, dtype=bool)


def shape_coverage(shape: str, cx: float, cy: float, radius: float, angle: float, width: int, height: int,
                   proportion: float | None = None, supersample: int = VARIETY_SUPERSAMPLE) -> np.ndarray:
    """Share of each pixel the shape covers, (H, W) float32 in [0, 1]: drawn `supersample` times finer
    in a window around the shape, then averaged back (anti-aliased edges)."""
    s = supersample
    # Every shape lies within radius * sqrt(2) of its centre (a turned square's corners reach past the
    # radius: up to 0.92 * sqrt(2) = 1.3 r); a window of +-radius would cut them off.
    reach = radius * math.sqrt(2)
    x0, y0 = max(0, int(cx - reach) - 2), max(0, int(cy - reach) - 2)
    x1, y1 = min(width, int(cx + reach) + 3), min(height, int(cy + reach) + 3)
    coverage = np.zeros((height, width), np.float32)
    if x1 <= x0 or y1 <= y0:
        return coverage
    fine = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    _draw_shape(ImageDraw.Draw(fine), shape, (cx - x0) * s, (cy - y0) * s, radius * s, angle, proportion, fill=255)
    cells = np.asarray(fine, np.float32).reshape(y1 - y0, s, x1 - x0, s)
    coverage[y0:y1, x0:x1] = cells.mean(axis=(1, 3)) / 255.0
    return coverage


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A desaturated textured background (objects are saturated, so colours stay readable)."""
    def dull_color() -> np.ndarray:
        gray = rng.uniform(90, 205)
        tint = rng.uniform(-18, 18, size=3)
        return np.clip(gray + tint, 0, 255)

    kind = rng.choice(["noise", "gradient", "stripes", "blobs"])
    ys, xs = np.ogrid[0:height, 0:width]
    ys, xs = ys.astype(np.float32), xs.astype(np.float32)
    base = dull_color()
    if kind == "gradient":
        other = dull_color()
        theta = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(theta) + ys * math.sin(theta)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        image = base * (1 - ramp[..., None]) + other * ramp[..., None]
    elif kind == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(12, 40)
        wave = np.sign(np.sin(2 * math.pi * (xs * math.cos(theta) + ys * math.sin(theta)) / period))
        image = base + rng.uniform(8, 18) * wave[..., None]
    elif kind == "blobs":
        cells = rng.normal(0, 1, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8))))
        field_img = Image.fromarray(((cells - cells.min()) / max(float(np.ptp(cells)), 1e-6) * 255).astype(np.uint8))
        smooth = np.asarray(field_img.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0 - 0.5
        image = base + rng.uniform(20, 40) * smooth[..., None]
    else:
        image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
        image = image + rng.standard_normal(size=(height, width, 1), dtype=np.float32) * rng.uniform(4, 9)
    return np.broadcast_to(image, (height, width, 3)).astype(np.float32)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _boxes_touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 3) -> bool:
    return a[0] - margin <= b[2] and b[0] - margin <= a[2] and a[1] - margin <= b[3] and b[1] - margin <= a[3]


def render_scene(scene_id: int, seed: int, config: SyntheticConfig = SyntheticConfig()) -> Scene:
    """Draw one scene; identical (scene_id, seed, config) give an identical scene."""
    rng = np.random.default_rng([seed, scene_id, 1])
    for _ in range(RENDER_ATTEMPTS):
        scene = _try_render(rng, scene_id, config)
        if scene is not None:
            return scene
    raise ValueError(f"scene {scene_id}: could not place min_objects={config.min_objects} objects with unique "
                     f"names and visible parts in {RENDER_ATTEMPTS} tries; lower min_objects or raise the image size")


def _try_render(rng: np.random.Generator, scene_id: int, config: SyntheticConfig) -> Scene | None:
    width = int(rng.integers(config.min_side, config.max_side + 1))
    height = int(rng.integers(config.min_side, config.max_side + 1))
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    used: set[tuple[str, str]] = set()
    full_masks: list[np.ndarray] = []
    coverages: list[np.ndarray | None] = []  # anti-aliased coverage per object (shape_variety only)
    objects: list[SceneObject] = []
    for _ in range(wanted):
        for _attempt in range(12):
            color = str(rng.choice(list(COLORS)))
            shape = str(rng.choice(SHAPES))
            if config.colour_repeat_share and objects and rng.random() < config.colour_repeat_share:
                color = objects[int(rng.integers(len(objects)))].color
            if (color, shape) in used:  # names stay unique so "the blue star" is unambiguous
                continue
            size = str(rng.choice(list(SIZE_CLASSES)))
            low, high = SIZE_CLASSES[size]
            if size == "small":
                low = config.min_radius
            radius = rng.uniform(low, high) * min(width, height)
            cx = rng.uniform(radius + 1, width - radius - 2)
            cy = rng.uniform(radius + 1, height - radius - 2)
            angle = rng.uniform(-config.max_rotation, config.max_rotation)
            if config.shape_variety:
                proportion = float(rng.uniform(*SHAPE_PROPORTIONS[shape][1])) if shape in SHAPE_PROPORTIONS else None
                coverage = shape_coverage(shape, cx, cy, radius, angle, width, height, proportion)
                full = coverage >= 0.5
            else:
                coverage, full = None, shape_mask(shape, cx, cy, radius, angle, width, height)
            if any(obj.color == color and _boxes_touch(_tight_box(f), _tight_box(full))
                   for obj, f in zip(objects, full_masks)):
                continue  # same-coloured neighbours would merge into one blob
            visible_after = [obj.mask & ~full for obj in objects]
            if all(v.sum() >= config.min_visible_fraction * f.sum() and v.any()
                   for v, f in zip(visible_after, full_masks)):
                for obj, visible in zip(objects, visible_after):
                    obj.mask = visible
                objects.append(SceneObject(color, shape, size, float(radius), full))
                full_masks.append(full)
                coverages.append(coverage)
                used.add((color, shape))
                break
    if len(objects) < config.min_objects:
        return None
    image = _background(rng, width, height)
    for obj, coverage in zip(objects, coverages):
        obj.box = _tight_box(obj.mask)
        fill = np.clip(np.array(COLORS[obj.color]) + rng.uniform(-18, 18, size=3), 0, 255)
        if coverage is None:
            image[obj.mask] = fill
        else:  # painted in order, so a later object's edge blends over an earlier one, as it occludes it
            image = image * (1 - coverage[..., None]) + fill * coverage[..., None]
    sigma = rng.uniform(0.4, 1.0) * config.pixel_noise
    if sigma > 0:
        image = image + rng.standard_normal(size=(height, width, 1), dtype=np.float32) * sigma
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(scene_id, width, height, pixels, objects)


def scribble_mask(obj: SceneObject, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A free-form stroke over part of the object: a thick polyline through 2-3 of its pixels,
    clipped to the object's visible mask (so it never touches a neighbour)."""
    ys, xs = np.nonzero(obj.mask)
    picks = rng.choice(len(xs), size=int(rng.integers(2, 4)), replace=True)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    points = [(float(xs[i]), float(ys[i])) for i in picks]
    draw.line(points, fill=1, width=max(3, int(0.35 * obj.radius)))
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=1)
    return np.asarray(canvas, dtype=bool) & obj.mask


# ---------------------------------------------------------------- task families


def _article(name: str) -> str:
    return "An" if name[0] in "aeiou" else "A"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


class _SampleBuilder:
    """Builds the GRIT-format samples of one scene."""

    def __init__(self, scene: Scene, rng: np.random.Generator, config: SyntheticConfig):
        self.scene, self.rng, self.config = scene, rng, config
        self._rle_cache: dict[int, dict] = {}

    def rle(self, obj_index: int) -> dict:
        if obj_index not in self._rle_cache:
            self._rle_cache[obj_index] = encode_rle(self.scene.objects[obj_index].mask)
        return self._rle_cache[obj_index]

    def sample(self, task: str, subtask: str, question: str, answer: str,
               human_objs: list[int], gpt_objs: list[int], free_form: bool = False) -> dict:
        objs = self.scene.objects
        record = {
            "image": self.scene.image_name,
            "image_w": self.scene.width,
            "image_h": self.scene.height,
            "dataset": DATASET_NAME,
            "location_instruction": True,
            "task": task,
            "subtask": subtask,
            "scene_id": self.scene.scene_id,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "box_x1y1x2y2": [[list(objs[i].box) for i in human_objs], [list(objs[i].box) for i in gpt_objs]],
            "masks": [[self.rle(i) for i in human_objs], [self.rle(i) for i in gpt_objs]],
        }
        if free_form:
            scribbles = [encode_rle(scribble_mask(objs[i], self.rng, self.scene.width, self.scene.height))
                         for i in human_objs]
            record["region_format"] = ["free_form", None]
            record["scribbles"] = [scribbles, []]
        elif human_objs and self.rng.random() < self.config.unsegmented_region_prob:
            record["masks"][0] = [None] * len(human_objs)
        return record

    def _pick(self) -> int:
        return int(self.rng.integers(len(self.scene.objects)))

    def _free_form(self) -> bool:
        return bool(self.rng.random() < self.config.free_form_prob)

    def _benchmark_wording(self) -> bool:
        return bool(self.rng.random() < BENCHMARK_WORDING_PROB)

    def _absent_name(self) -> str:
        present = {o.name for o in self.scene.objects}
        options = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
        return options[int(self.rng.integers(len(options)))]

    def refer_object(self) -> dict | None:
        i = self._pick()
        obj = self.scene.objects[i]
        answer = f"{_article(obj.color)} {obj.name}."
        if self._benchmark_wording():
            # LVIS: the true class against a class absent from the scene, in random order.
            pair = [obj.name, self._absent_name()]
            if self.rng.random() < 0.5:
                pair.reverse()
            return self.sample("refer_object", "lvis", LVIS_QUESTION.format(first=pair[0], second=pair[1]),
                               answer, [i], [], self._free_form())
        return self.sample("refer_object", "name", "What is the object <bbox_location0>?",
                           answer, [i], [], self._free_form())

    def refer_attribute(self) -> dict | None:
        i = self._pick()
        obj = self.scene.objects[i]
        if self.rng.random() < 0.5:
            return self.sample("refer_attribute", "color", "What color is the object <bbox_location0>?",
                               f"{_cap(obj.color)}.", [i], [], self._free_form())
        return self.sample("refer_attribute", "size", "What size is the object <bbox_location0>?",
                           f"{_cap(obj.size)}.", [i], [], self._free_form())

    def ground(self) -> dict | None:
        i = self._pick()
        name = self.scene.objects[i].name
        if self._benchmark_wording():
            return self.sample("ground", "refcoco", REFCOCO_QUESTION.format(name=name),
                               f"The {name} <bbox_location0>.", [], [i])
        return self.sample("ground", "describe", f"Where is the {name}?",
                           f"The {name} <bbox_location0>.", [], [i])

    @staticmethod
    def _listing(names: list[str]) -> str:
        """ "A red circle <bbox_location0>, a blue star <bbox_location1> and a ..." """
        parts = [f"{'a' if k else 'A'} {name} <bbox_location{k}>" for k, name in enumerate(names)]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def grounded_caption(self) -> dict | None:
        objs = self.scene.objects
        order = sorted(range(len(objs)), key=lambda k: objs[k].box[0])
        if self._benchmark_wording():
            # Flickr: ground the listed phrases, left to right, as the synthetic report asks them.
            count = int(self.rng.integers(1, len(order) + 1))
            keep = set(self.rng.choice(len(order), size=count, replace=False).tolist())
            order = [j for k, j in enumerate(order) if k in keep]
            phrases = ", ".join(f"a {objs[j].name}" for j in order)
            return self.sample("grounded_caption", "flickr", FLICKR_QUESTION.format(phrases=phrases),
                               self._listing([objs[j].name for j in order]) + ".", [], order)
        return self.sample("grounded_caption", "all_objects",
                           "Describe the image with the locations of the objects.",
                           self._listing([objs[j].name for j in order]) + ".", [], order)

    def relation(self) -> dict | None:
        if len(self.scene.objects) < 2:  # a one-object scene has no relation to ask about
            return None
        for _ in range(6):  # some scenes cannot answer some relations clearly: try another
            sample = self._relation_once(str(self.rng.choice(["left", "above", "largest", "nearest"])))
            if sample is not None:
                return sample
        return None

    def _relation_once(self, kind: str) -> dict | None:
        objs = self.scene.objects
        if kind in ("left", "above"):
            a, b = (int(v) for v in self.rng.choice(len(objs), size=2, replace=False))
            axis, side = (0, self.scene.width) if kind == "left" else (1, self.scene.height)
            gap = objs[b].center[axis] - objs[a].center[axis]
            if abs(gap) < 0.1 * side:  # too close to call: ask something else
                return None
            word = "left of" if kind == "left" else "above"
            return self.sample("relation", kind, f"Is the object <bbox_location0> {word} the object <bbox_location1>?",
                               "Yes." if gap > 0 else "No.", [a, b], [])
        if kind == "largest":
            areas = sorted(((o.area, k) for k, o in enumerate(objs)), reverse=True)
            if areas[0][0] < 1.4 * areas[1][0]:
                return None
            best = areas[0][1]
            return self.sample("relation", "largest", "Which object is the largest?",
                               f"The {objs[best].name} <bbox_location0>.", [], [best])
        if len(objs) < 3:
            return None
        anchor = self._pick()
        ax, ay = objs[anchor].center
        dists = sorted((math.hypot(o.center[0] - ax, o.center[1] - ay), k)
                       for k, o in enumerate(objs) if k != anchor)
        if dists[0][0] > 0.75 * dists[1][0]:
            return None
        near = dists[0][1]
        return self.sample("relation", "nearest", "Which object is nearest to the object <bbox_location0>?",
                           f"The {objs[near].name} <bbox_location0>.", [anchor], [near])

    def negative(self) -> dict | None:
        objs = self.scene.objects
        if self.rng.random() < 0.5:
            i = self._pick()
            name = objs[i].name
            return self.sample("negative", "present", POPE_QUESTION.format(name=name),
                               f"Yes, the {name} <bbox_location0>.", [], [i])
        present = {(o.color, o.shape) for o in objs}
        anchor = objs[self._pick()]
        share, options = self.config.colour_negative_share, []
        if share is not None and self.rng.random() < share:
            # The anchor's colour with a shape it lacks here (none left: the default draw below).
            options = [(anchor.color, s) for s in SHAPES if (anchor.color, s) not in present]
        if not options:
            # Hard negatives half the time: share the colour or the shape of a present object.
            if self.rng.random() < 0.5:
                options = [(anchor.color, s) for s in SHAPES] + [(c, anchor.shape) for c in COLORS]
            else:
                options = [(c, s) for c in COLORS for s in SHAPES]
            options = [o for o in options if o not in present]
        color, shape = options[int(self.rng.integers(len(options)))]
        return self.sample("negative", "absent", POPE_QUESTION.format(name=f"{color} {shape}"), "No.", [], [])


def build_samples(scene: Scene, seed: int, count: int, config: SyntheticConfig = SyntheticConfig()) -> list[dict]:
    """`count` samples for one scene, families drawn by `config.task_weights`."""
    rng = np.random.default_rng([seed, scene.scene_id, 2])
    builder = _SampleBuilder(scene, rng, config)
    families = list(config.task_weights)
    weights = np.array([config.task_weights[f] for f in families], dtype=float)
    weights /= weights.sum()
    samples: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(samples) < count:
        attempts += 1
        family = families[int(rng.choice(len(families), p=weights))]
        sample = getattr(builder, family)()
        if sample is None:
            continue
        key = json.dumps(sample["conversations"]) + str(sample.get("region_format"))
        if key in seen and attempts < 40:  # prefer distinct questions per scene
            continue
        seen.add(key)
        sample["id"] = f"synth_{scene.scene_id:06d}_{len(samples)}"
        samples.append(sample)
    return samples


def chain_turns(samples: list[dict]) -> dict:
    """One multi-turn GRIT sample asking the questions of `samples` (all about one scene) in turn.

    Per-turn fields (boxes, masks, region formats, scribbles) are concatenated; only the first
    human turn keeps the image placeholder. `task`/`subtask` are the first turn's, `turn_tasks`
    lists every turn's "task/subtask".
    """
    if len(samples) == 1:
        return samples[0]
    first = samples[0]
    record = {k: v for k, v in first.items() if k not in ("conversations", "box_x1y1x2y2", "masks",
                                                          "region_format", "scribbles")}
    record.update(conversations=[], box_x1y1x2y2=[], masks=[], turn_tasks=[])
    has_free_form = any("scribbles" in x for x in samples)
    if has_free_form:
        record.update(region_format=[], scribbles=[])
    for k, sample in enumerate(samples):
        human, gpt = sample["conversations"]
        question = human["value"] if k == 0 else human["value"].replace(f"{IMAGE_TOKEN}\n", "", 1)
        record["conversations"] += [{"from": "human", "value": question}, dict(gpt)]
        record["box_x1y1x2y2"] += sample["box_x1y1x2y2"]
        record["masks"] += sample["masks"]
        record["turn_tasks"].append(f"{sample['task']}/{sample['subtask']}")
        if has_free_form:
            record["region_format"] += sample.get("region_format", [None, None])
            record["scribbles"] += sample.get("scribbles", [[], []])
    return record


def scene_record(scene: Scene) -> dict:
    """Eval-ready record of a scene: its objects with names, attributes, boxes and masks."""
    return {
        "scene_id": scene.scene_id,
        "image": scene.image_name,
        "width": scene.width,
        "height": scene.height,
        "objects": [
            {"name": o.name, "color": o.color, "shape": o.shape, "size": o.size,
             "box": list(o.box), "area": o.area, "mask": encode_rle(o.mask)}
            for o in scene.objects
        ],
    }


# ---------------------------------------------------------------- writing


def split_of_scenes(num_scenes: int, seed: int, config: SyntheticConfig) -> list[str]:
    """Split label per scene id: samples of one scene never cross splits."""
    split = min(config.split_scenes, num_scenes) if config.split_scenes > 0 else num_scenes
    order = np.random.default_rng([seed, 0]).permutation(split)
    n_test = max(1, round(split * config.test_fraction)) if split >= 3 else 0
    n_val = max(1, round(split * config.val_fraction)) if split >= 3 else 0
    labels = ["train"] * num_scenes
    for rank, scene_id in enumerate(order.tolist()):
        if rank < n_test:
            labels[scene_id] = "test"
        elif rank < n_test + n_val:
            labels[scene_id] = "val"
    return labels


def _make_scene(job: tuple[str, int, int, int, SyntheticConfig]) -> tuple[dict, list[dict]]:
    out_dir, scene_id, seed, count, config = job
    scene = render_scene(scene_id, seed, config)
    Image.fromarray(scene.image).save(os.path.join(out_dir, scene.image_name), compress_level=1)
    samples = build_samples(scene, seed, count, config)
    k = config.turns_per_sample
    return scene_record(scene), [chain_turns(samples[i:i + k]) for i in range(0, len(samples), k)]


def generate(out_dir: str, n: int, seed: int = 0, config: SyntheticConfig = SyntheticConfig(),
             workers: int = 2) -> dict:
    """Write `n` samples (train/val/test json, PNG images, scene records); returns a summary."""
    if n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    start = time.perf_counter()
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    per_scene = config.samples_per_scene
    num_scenes = math.ceil(n / per_scene)
    counts = [per_scene] * num_scenes
    counts[-1] = n - per_scene * (num_scenes - 1)
    jobs = [(out_dir, s, seed, counts[s], config) for s in range(num_scenes)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_make_scene, jobs, chunksize=16)
    else:
        results = [_make_scene(job) for job in jobs]
    labels = split_of_scenes(num_scenes, seed, config)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    scenes_by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for (record, samples), label in zip(results, labels):
        by_split[label].extend(samples)
        scenes_by_split[label].append(record)
    for split in SPLITS:
        with open(os.path.join(out_dir, f"{split}.json"), "w") as handle:
            json.dump(by_split[split], handle)
    for split in SPLITS:
        with open(os.path.join(out_dir, f"scenes_{split}.json"), "w") as handle:
            json.dump(scenes_by_split[split], handle)
    # Counted per question/answer pair (a chained sample holds several).
    turn_labels = [t for v in by_split.values() for x in v for t in x.get("turn_tasks", [f"{x['task']}/{x['subtask']}"])]
    summary = {
        "seed": seed,
        "samples": n,
        "scenes": num_scenes,
        "samples_per_split": {s: len(v) for s, v in by_split.items()},
        "scenes_per_split": {s: len(v) for s, v in scenes_by_split.items()},
        "task_counts": dict(sorted(Counter(t.split("/")[0] for t in turn_labels).items())),
        "subtask_counts": dict(sorted(Counter(turn_labels).items())),
        "free_form_samples": sum("scribbles" in x for v in by_split.values() for x in v),
        "config": asdict(config),
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "seconds": round(time.perf_counter() - start, 2),
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def parse_task_weights(items: list[str]) -> dict[str, float]:
    """TASK_WEIGHTS with each "family=weight" item applied; the weights need not sum to 1."""
    weights = dict(TASK_WEIGHTS)
    for item in items:
        family, sep, value = item.partition("=")
        family = family.strip()
        if not sep or family not in weights:
            raise ValueError(f"--task-weight wants FAMILY=WEIGHT with FAMILY one of {sorted(weights)}, got {item!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--task-weight {item!r}: {value!r} is not a number") from None
        if not (weight >= 0.0 and math.isfinite(weight)):
            raise ValueError(f"--task-weight {item!r}: the weight must be a finite number >= 0")
        weights[family] = weight
    if sum(weights.values()) <= 0.0:
        raise ValueError("--task-weight: at least one family needs a weight > 0")
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic GRIT world.")
    parser.add_argument("--out", required=True, help="output folder (images/, train/val/test.json)")
    parser.add_argument("--n", type=int, default=20000, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-scene", type=int, default=SyntheticConfig.samples_per_scene)
    parser.add_argument("--min-side", type=int, default=SyntheticConfig.min_side)
    parser.add_argument("--max-side", type=int, default=SyntheticConfig.max_side)
    parser.add_argument("--turns-per-sample", type=int, default=SyntheticConfig.turns_per_sample,
                        help="chain up to this many question/answer pairs of a scene into one sample")
    parser.add_argument("--min-objects", type=int, default=SyntheticConfig.min_objects)
    parser.add_argument("--max-objects", type=int, default=SyntheticConfig.max_objects,
                        help="1 and 1 make a curriculum world where every name has one answer")
    parser.add_argument("--task-weight", action="append", default=[], metavar="FAMILY=WEIGHT",
                        help="change one question family's weight (repeatable), e.g. negative=0.30; "
                             f"families and defaults: {TASK_WEIGHTS}")
    parser.add_argument("--split-scenes", type=int, default=0, metavar="N",
                        help="draw val/test from the first N scenes only, as a world of N scenes does; "
                             "later scenes are all train (a bigger world with the same held-out splits)")
    parser.add_argument("--max-rotation", type=float, default=SyntheticConfig.max_rotation, metavar="DEG",
                        help="shapes turn by up to this many degrees either way (180: any angle)")
    parser.add_argument("--shape-variety", action="store_true",
                        help="each object gets its own proportions and anti-aliased edges (SHAPE_PROPORTIONS)")
    parser.add_argument("--min-radius", type=float, default=SyntheticConfig.min_radius, metavar="FRACTION",
                        help="smallest radius of a 'small' object, a fraction of the shorter side "
                             f"(default {SyntheticConfig.min_radius}, at most {SIZE_CLASSES['small'][1]})")
    parser.add_argument("--colour-negative-share", type=float, default=None, metavar="P",
                        help="share of absent names that take a present object's colour with another shape "
                             "(default: half the absent names share a present colour or shape)")
    parser.add_argument("--colour-repeat-share", type=float, default=None, metavar="P",
                        help="chance that each object after the first takes a placed object's colour "
                             "(default: every colour drawn uniformly)")
    parser.add_argument("--pixel-noise", type=float, default=SyntheticConfig.pixel_noise, metavar="SIGMA",
                        help="gaussian noise over the whole image, objects included, sigma drawn per scene "
                             "in [0.4, 1] x SIGMA (default 0: off)")
    args = parser.parse_args(argv)
    if args.turns_per_sample < 1:
        parser.error(f"--turns-per-sample must be >= 1, got {args.turns_per_sample}")
    if not 32 <= args.min_side <= args.max_side:
        parser.error(f"need 32 <= --min-side <= --max-side, got {args.min_side}, {args.max_side}")
    if not 1 <= args.min_objects <= args.max_objects <= len(COLORS) * len(SHAPES):
        parser.error(f"need 1 <= --min-objects <= --max-objects <= {len(COLORS) * len(SHAPES)}, "
                     f"got {args.min_objects}, {args.max_objects}")
    if args.split_scenes < 0:
        parser.error(f"--split-scenes must be >= 0, got {args.split_scenes}")
    if not 0 <= args.max_rotation <= 180:
        parser.error(f"--max-rotation must be in [0, 180] degrees, got {args.max_rotation}")
    if not 0.03 <= args.min_radius <= SIZE_CLASSES["small"][1]:
        parser.error(f"--min-radius must be in [0.03, {SIZE_CLASSES['small'][1]}] (a fraction of the shorter "
                     f"side; below 0.03 the smallest canvas draws objects of 2 px), got {args.min_radius}")
    if args.colour_negative_share is not None and not 0 <= args.colour_negative_share <= 1:
        parser.error(f"--colour-negative-share must be in [0, 1], got {args.colour_negative_share}")
    if args.colour_repeat_share is not None and not 0 <= args.colour_repeat_share <= 1:
        parser.error(f"--colour-repeat-share must be in [0, 1], got {args.colour_repeat_share}")
    if not 0 <= args.pixel_noise <= 64:
        parser.error(f"--pixel-noise must be in [0, 64] (a sigma in 0-255 pixel units), got {args.pixel_noise}")
    try:
        task_weights = parse_task_weights(args.task_weight)
    except ValueError as exc:
        parser.error(str(exc))
    config = SyntheticConfig(samples_per_scene=args.samples_per_scene, min_side=args.min_side,
                             max_side=args.max_side, turns_per_sample=args.turns_per_sample,
                             min_objects=args.min_objects, max_objects=args.max_objects,
                             task_weights=task_weights, split_scenes=args.split_scenes,
                             max_rotation=args.max_rotation, shape_variety=args.shape_variety,
                             min_radius=args.min_radius, colour_negative_share=args.colour_negative_share,
                             colour_repeat_share=args.colour_repeat_share,
                             pixel_noise=args.pixel_noise)
    try:
        summary = generate(args.out, args.n, args.seed, config, args.workers)
    except ValueError as exc:  # a world these settings cannot draw: one line, no traceback
        parser.error(str(exc))
    print(json.dumps({k: summary[k] for k in ("samples", "scenes", "samples_per_split", "task_counts",
                                              "subtask_counts", "free_form_samples", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
