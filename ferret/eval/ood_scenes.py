"""Out-of-generator scenes: the synthetic world's vocabulary drawn by independent code.

    python -m ferret.eval.ood_scenes --out data/ood --n 60 --seed 0

writes `data/ood/images/ood_*.png`, `data/ood/scenes_ood.json` (records in exactly the format of
`scenes_test.json`, see `ferret.data.synthetic.scene_record`) and `data/ood/ood_meta.json` (per
scene: canvas kind, background kind, occlusion; not read by the evaluations). Then score a model
on them with the two existing evaluations (`--max-scenes 0`: all scenes, the default is 40):

    python -m ferret.eval.synthetic_report --data data/ood --split ood --max-scenes 0 --out results/ood/report [--model-path PATH]
    python -m ferret.eval.synthetic_direct --data data/ood --split ood --max-scenes 0 --out results/ood/direct [--model-path PATH]

or render, run both and check the goals of issue 13 (grounding Acc@0.5 >= 0.75, naming >= 0.90
for box, point and free-form regions) in one command, which writes `<eval>/ood_summary.json`
(with both scores per canvas kind and per background kind):

    python -m ferret.eval.ood_scenes --out data/ood --n 60 --seed 0 --evaluate results/ood [--model-path PATH]

Nothing here calls the generator's drawing code (`shape_mask`, `_background`, `render_scene`);
it shares only the names (`COLORS`, `SHAPES`, `SIZE_CLASSES`) and the record format
(`SceneObject`, `Scene`, `scene_record`). What differs from the generator's distribution:
  * canvases (cycled by scene id): "compact" 200-300 x 150-225, "large" 400-640 x 330-480 (both
    sides above the generator's 320), "wide" 480-640 wide with aspect 2.1-2.6 and "tall" 400-480
    high with aspect 0.42-0.48, so 168-230 wide (the generator's sides are 160-320 each, aspect
    0.5-2; the model squashes every image to a square, so wide and tall canvases distort more);
  * backgrounds (cycled by scene id): plain (white, gray, near-black or pastel), gaussian noise
    (sigma 8-22 over the whole image, colour or mono), salt-and-pepper (1.5-5 % of all pixels),
    linear gradient and radial gradient between two contrasting neutral colours;
  * 1-5 objects (the generator draws 2-5), drawn 4x supersampled (anti-aliased edges; an object's
    mask is the pixels its coverage wins with >= 0.5), fill colour the world's RGB +-15 per channel,
    some with a darker outline or a brightness ramp;
  * shapes with their own proportions (square half-side 0.78-0.88 r, star inner radius 0.38-0.50 r,
    cross arm half-width 0.26-0.36 r, ring hole 0.45-0.62 r) and rotations (square and cross
    +-35 deg, triangle +-40 deg, star any; the generator: +-20 deg unless --max-rotation says more);
  * radius a continuous 0.065-0.27 of the shorter side (at least 0.028 of the longer side, so no
    object falls under ~7 px when the image is squashed to the model's square input), with none
    of the generator's gaps between size classes. The record's `size` is the nearest class:
    small below 0.12, medium below 0.185, large above (fractions of the shorter side);
  * light occlusion allowed in 40 % of scenes (`occlusion_allowed`; an occluded object keeps
    >= 80 % of its pixels); otherwise objects keep 3 px apart. Same-coloured objects never
    touch; an object's colour is at least 100 RGB units from the background under it.
Names stay unique per scene ("blue square"), as in the generator. Everything follows from
`--seed`: one generator per scene, seeded with (seed, scene_id). `ferret/assets/examples/
ood_example.png` is scene 2 of `--seed 0` (640x256, salt-and-pepper, five objects, one occluded).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ferret.data.synthetic import COLORS, SHAPES, SIZE_CLASSES, Scene, SceneObject, scene_record

SPLIT = "ood"
SIZE_KINDS = ("compact", "large", "wide", "tall")
BACKGROUND_KINDS = ("plain", "gaussian_noise", "salt_pepper", "linear_gradient", "radial_gradient")
MIN_OBJECTS, MAX_OBJECTS = 1, 5
RADIUS_FRACTION = (0.065, 0.27)  # of the shorter side
MIN_RADIUS_OF_LONG_SIDE = 0.028
SIZE_BOUNDS = (0.12, 0.185)  # small < 0.12 <= medium < 0.185 <= large (radius / shorter side)
COLOR_JITTER = 15
SUPERSAMPLE = 4
MIN_VISIBLE_FRACTION = 0.8
SEPARATION_PX = 3
SAME_COLOR_SEPARATION_PX = 5
MIN_BACKGROUND_CONTRAST = 100.0
GOALS = {"grounding_acc@0.5": 0.75, "naming": 0.90}

assert set(SIZE_CLASSES) == {"small", "medium", "large"}


@dataclass
class OodScene:
    scene: Scene
    size_kind: str
    background: str
    occlusion: bool
    styles: list[dict]  # per object: radius / shorter side, visible share, outline, brightness ramp

    def meta(self) -> dict:
        return {"scene_id": self.scene.scene_id, "image": self.scene.image_name, "width": self.scene.width,
                "height": self.scene.height, "size_kind": self.size_kind, "background": self.background,
                "occlusion_allowed": self.occlusion, "num_objects": len(self.scene.objects),
                "objects": self.styles}


class _OodScene(Scene):
    """A Scene whose image file is called ood_<id>.png (the record format is unchanged)."""

    @property
    def image_name(self) -> str:
        return f"images/ood_{self.scene_id:06d}.png"


# ---------------------------------------------------------------- canvas and background


def canvas_size(kind: str, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one canvas kind."""
    if kind == "compact":
        return int(rng.integers(200, 301)), int(rng.integers(150, 226))
    if kind == "large":
        return int(rng.integers(400, 641)), int(rng.integers(330, 481))
    if kind == "wide":
        width = int(rng.integers(480, 641))
        return width, int(round(width / rng.uniform(2.1, 2.6)))
    if kind == "tall":
        height = int(rng.integers(400, 481))
        return int(round(height * rng.uniform(0.42, 0.48))), height
    raise ValueError(f"unknown canvas kind {kind!r}; known: {SIZE_KINDS}")


def _neutral(rng: np.random.Generator, family: int) -> np.ndarray:
    """A low-saturation colour: 0 white-ish, 1 light/mid gray, 2 near-black, 3 pastel tint."""
    if family == 0:
        gray, tint = rng.uniform(232, 252), 5.0
    elif family == 1:
        gray, tint = rng.uniform(110, 215), 12.0
    elif family == 2:
        gray, tint = rng.uniform(12, 65), 10.0
    else:
        gray, tint = rng.uniform(200, 235), 24.0
    return np.clip(gray + rng.uniform(-tint, tint, size=3), 0, 255).astype(np.float32)


def background(kind: str, rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, dict]:
    """(H, W, 3) float32 background before noise, and the noise to add over the finished image."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    noise: dict = {}
    if kind in ("linear_gradient", "radial_gradient"):
        first, second = rng.choice(4, size=2, replace=False)
        a, b = _neutral(rng, int(first)), _neutral(rng, int(second))
        if kind == "linear_gradient":
            theta = rng.uniform(0, 2 * math.pi)
            ramp = xs * math.cos(theta) + ys * math.sin(theta)
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            ramp = np.hypot(xs - cx, ys - cy)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
        image = a * (1 - ramp[..., None]) + b * ramp[..., None]
    else:
        image = np.broadcast_to(_neutral(rng, int(rng.integers(4))), (height, width, 3)).copy()
        if kind == "gaussian_noise":
            noise = {"gaussian": float(rng.uniform(8, 22)), "mono": bool(rng.random() < 0.5)}
        elif kind == "salt_pepper":
            noise = {"salt_pepper": float(rng.uniform(0.015, 0.05))}
        elif kind != "plain":
            raise ValueError(f"unknown background kind {kind!r}; known: {BACKGROUND_KINDS}")
    return image.astype(np.float32), noise


def _add_noise(image: np.ndarray, noise: dict, rng: np.random.Generator) -> np.ndarray:
    height, width, _ = image.shape
    if "gaussian" in noise:
        channels = 1 if noise["mono"] else 3
        image = image + rng.standard_normal(size=(height, width, channels), dtype=np.float32) * noise["gaussian"]
    if "salt_pepper" in noise:
        hit = rng.random(size=(height, width)) < noise["salt_pepper"]
        salt = rng.random(size=(height, width)) < 0.5
        image = image.copy()
        image[hit & salt] = 255.0
        image[hit & ~salt] = 0.0
    return image


# ---------------------------------------------------------------- shapes


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return points @ np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])


@dataclass
class _Shape:
    """One shape's geometry around its centre: polygons (or circles) as offsets in pixels."""
    kind: str
    radius: float
    points: np.ndarray  # (K, 2) outer boundary (circles: 64 points, for the extent only)
    hole: float = 0.0  # ring: inner radius

    @property
    def extent(self) -> tuple[float, float, float, float]:
        pts = self.points
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def make_shape(kind: str, radius: float, rng: np.random.Generator) -> _Shape:
    """The shape's own proportions and rotation, drawn from the ranges in the module docstring."""
    if kind in ("circle", "ring"):
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        circle = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
        hole = radius * rng.uniform(0.45, 0.62) if kind == "ring" else 0.0
        return _Shape(kind, radius, circle, hole)
    if kind == "square":
        h = radius * rng.uniform(0.78, 0.88)
        points, degrees = np.array([[-h, -h], [h, -h], [h, h], [-h, h]]), rng.uniform(-35, 35)
    elif kind == "triangle":
        r = radius * rng.uniform(0.97, 1.05)
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        points, degrees = np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1), rng.uniform(-40, 40)
    elif kind == "star":
        inner = rng.uniform(0.38, 0.50)
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = radius * np.where(np.arange(10) % 2 == 0, 1.0, inner)
        points, degrees = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), rng.uniform(0, 72)
    elif kind == "cross":
        w, a = radius * rng.uniform(0.26, 0.36), radius * 0.98
        points = np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w],
                           [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w]])
        degrees = rng.uniform(-30, 30)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")
    return _Shape(kind, radius, _rotate(points, degrees))


def coverage(shape: _Shape, cx: float, cy: float, width: int, height: int,
             outline_px: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Anti-aliased coverage in [0, 1] of the shape (and of its outline band, if any), (H, W) float32.

    Drawn SUPERSAMPLE x larger on a patch around the shape and box-averaged back down.
    """
    x0, y0, x1, y1 = shape.extent
    px0, py0 = max(int(math.floor(cx + x0)) - 2, 0), max(int(math.floor(cy + y0)) - 2, 0)
    px1, py1 = min(int(math.ceil(cx + x1)) + 3, width), min(int(math.ceil(cy + y1)) + 3, height)
    s = SUPERSAMPLE
    size = ((px1 - px0) * s, (py1 - py0) * s)

    def to_hi(points: np.ndarray) -> list[tuple[float, float]]:
        # low-res pixel i covers [i - 0.5, i + 0.5]; high-res pixel centres sit at (I + 0.5) / s - 0.5
        return [((x + cx - px0 + 0.5) * s - 0.5, (y + cy - py0 + 0.5) * s - 0.5) for x, y in points.tolist()]

    def draw(band: bool) -> np.ndarray:
        canvas = Image.new("L", size, 0)
        pen = ImageDraw.Draw(canvas)
        width_hi = max(1, int(round(outline_px * s)))
        centre = ((cx - px0 + 0.5) * s - 0.5, (cy - py0 + 0.5) * s - 0.5)
        if shape.kind in ("circle", "ring"):
            rings = [shape.radius] + ([shape.hole] if shape.hole else [])
            for k, r in enumerate(rings):
                bbox = (centre[0] - r * s, centre[1] - r * s, centre[0] + r * s, centre[1] + r * s)
                if band:
                    pen.ellipse(bbox, outline=255, width=width_hi)
                else:
                    pen.ellipse(bbox, fill=255 if k == 0 else 0)
        else:
            points = to_hi(shape.points)
            if band:
                pen.line(points + points[:1], fill=255, width=width_hi, joint="curve")
            else:
                pen.polygon(points, fill=255)
        small = canvas.reduce(s)
        return np.asarray(small, dtype=np.float32) / 255.0

    full = np.zeros((height, width), dtype=np.float32)
    fill = draw(band=False)
    full[py0:py1, px0:px1] = fill
    if outline_px <= 0:
        return full, None
    band = np.zeros((height, width), dtype=np.float32)
    band[py0:py1, px0:px1] = np.minimum(draw(band=True), fill)  # the outline stays on the shape
    return full, band


# ---------------------------------------------------------------- scenes


def size_class(radius: float, width: int, height: int) -> str:
    fraction = radius / min(width, height)
    return "small" if fraction < SIZE_BOUNDS[0] else "medium" if fraction < SIZE_BOUNDS[1] else "large"


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Square dilation of a bool mask by `px` pixels."""
    out = mask.copy()
    for shift in range(1, px + 1):  # rows, then columns (the square is separable)
        out[shift:] |= mask[:-shift]
        out[:-shift] |= mask[shift:]
    rows = out.copy()
    for shift in range(1, px + 1):
        out[:, shift:] |= rows[:, :-shift]
        out[:, :-shift] |= rows[:, shift:]
    return out


@dataclass
class _Placed:
    color: str
    shape: str
    radius: float
    fill_rgb: np.ndarray
    cover: np.ndarray  # (H, W) float coverage of the object (its outline band lies inside it)
    band: np.ndarray | None
    outline_rgb: np.ndarray | None
    ramp: np.ndarray | None  # (H, W) brightness factor, or None

    @property
    def footprint(self) -> np.ndarray:
        return self.cover >= 0.5


def occlusion_allowed(scene_id: int) -> bool:
    """Light occlusion in 2 of every 5 runs of four scene ids (40 %, every canvas kind alike)."""
    return (scene_id // len(SIZE_KINDS)) % 5 < 2


def render_ood_scene(scene_id: int, seed: int = 0) -> OodScene:
    """Draw one out-of-generator scene; identical (scene_id, seed) give an identical scene."""
    rng = np.random.default_rng([seed, scene_id, 7])
    size_kind = SIZE_KINDS[scene_id % len(SIZE_KINDS)]
    bg_kind = BACKGROUND_KINDS[scene_id % len(BACKGROUND_KINDS)]
    width, height = canvas_size(size_kind, rng)
    base, noise = background(bg_kind, rng, width, height)
    occlusion = occlusion_allowed(scene_id)
    wanted = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    short, long = min(width, height), max(width, height)
    low = max(RADIUS_FRACTION[0], MIN_RADIUS_OF_LONG_SIDE * long / short)
    names = [(c, s) for c in COLORS for s in SHAPES]
    placed: list[_Placed] = []
    for _ in range(wanted):
        for attempt in range(40):
            color, shape_kind = names[int(rng.integers(len(names)))]
            if any(p.color == color and p.shape == shape_kind for p in placed):
                continue
            # later attempts try smaller objects, so crowded canvases still fit `wanted`
            high = max(low, RADIUS_FRACTION[1] - 0.004 * attempt)
            radius = rng.uniform(low, high) * short
            shape = make_shape(shape_kind, radius, rng)
            x0, y0, x1, y1 = shape.extent
            if x1 - x0 + 6 >= width or y1 - y0 + 6 >= height:
                continue
            cx = rng.uniform(-x0 + 2, width - x1 - 3)
            cy = rng.uniform(-y0 + 2, height - y1 - 3)
            outline_px = float(rng.uniform(1.0, 2.2)) if rng.random() < 0.25 else 0.0
            cover, band = coverage(shape, cx, cy, width, height, outline_px)
            footprint = cover >= 0.5
            if not footprint.any():
                continue
            fill_rgb = np.clip(np.array(COLORS[color], np.float32) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0, 255)
            under = base[footprint].mean(axis=0)
            if float(np.linalg.norm(under - fill_rgb)) < MIN_BACKGROUND_CONTRAST:
                continue
            near = _dilate(footprint, SAME_COLOR_SEPARATION_PX)
            if any(p.color == color and (p.footprint & near).any() for p in placed):
                continue
            if occlusion:
                # light occlusion: every earlier object keeps most of its pixels visible
                if any((_visible(placed, i) & ~footprint).sum() < MIN_VISIBLE_FRACTION * p.footprint.sum()
                       for i, p in enumerate(placed)):
                    continue
            else:
                spaced = _dilate(footprint, SEPARATION_PX)
                if any((p.footprint & spaced).any() for p in placed):
                    continue
            ramp = None
            if rng.random() < 0.3:  # a brightness ramp across the object
                theta = rng.uniform(0, 2 * math.pi)
                ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
                t = ((xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)) / max(radius, 1.0)
                ramp = 1.0 + np.clip(t, -1, 1) * float(rng.uniform(0.05, 0.1))
            outline_rgb = fill_rgb * float(rng.uniform(0.5, 0.65)) if band is not None else None
            placed.append(_Placed(color, shape_kind, float(radius), fill_rgb, cover, band, outline_rgb, ramp))
            break
    image = base.copy()
    for p in placed:
        rgb = p.fill_rgb[None, None, :] * (p.ramp[..., None] if p.ramp is not None else 1.0)
        a = p.cover[..., None]
        image = image * (1 - a) + rgb * a
        if p.band is not None:
            b = p.band[..., None]
            image = image * (1 - b) + p.outline_rgb[None, None, :] * b
    image = _add_noise(image, noise, rng)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    objects = []
    for i, p in enumerate(placed):
        mask = _visible(placed, i)
        obj = SceneObject(p.color, p.shape, size_class(p.radius, width, height), p.radius, mask)
        obj.box = _tight_box(mask)
        objects.append(obj)
    styles = [{"name": f"{p.color} {p.shape}", "radius_fraction": round(p.radius / short, 4),
               "visible_fraction": round(obj.area / int(p.footprint.sum()), 4),
               "outline": p.band is not None, "ramp": p.ramp is not None} for p, obj in zip(placed, objects)]
    return OodScene(_OodScene(scene_id, width, height, pixels, objects), size_kind, bg_kind, occlusion, styles)


def _visible(placed: list[_Placed], index: int) -> np.ndarray:
    """Pixels of object `index` that no later (drawn on top) object covers by >= 0.5."""
    mask = placed[index].footprint.copy()
    for later in placed[index + 1:]:
        mask &= ~later.footprint
    return mask


def generate_ood(out_dir: str | Path, n: int = 60, seed: int = 0) -> dict:
    """Write `n` scenes (images, scenes_ood.json, ood_meta.json) under `out_dir`; returns a summary."""
    if n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    start = time.perf_counter()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, metas = [], []
    for scene_id in range(n):
        ood = render_ood_scene(scene_id, seed)
        Image.fromarray(ood.scene.image).save(out / ood.scene.image_name, compress_level=1)
        records.append(scene_record(ood.scene))
        metas.append(ood.meta())
    (out / f"scenes_{SPLIT}.json").write_text(json.dumps(records))
    summary = {
        "seed": seed, "scenes": n,
        "objects": sum(len(r["objects"]) for r in records),
        "objects_per_scene": dict(sorted(Counter(len(r["objects"]) for r in records).items())),
        "size_kinds": dict(Counter(m["size_kind"] for m in metas)),
        "backgrounds": dict(Counter(m["background"] for m in metas)),
        "occlusion_scenes": sum(m["occlusion_allowed"] for m in metas),
        "width_range": [min(r["width"] for r in records), max(r["width"] for r in records)],
        "height_range": [min(r["height"] for r in records), max(r["height"] for r in records)],
        "size_classes": dict(Counter(o["size"] for r in records for o in r["objects"])),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "ood_meta.json").write_text(json.dumps({"summary": summary, "scenes": metas}, indent=1))
    return summary


# ---------------------------------------------------------------- one-command evaluation


def evaluate(data: str | Path, out: str | Path, model_path: str | None = None, seed: int = 0,
             batch_size: int = 8, device: str = "auto", max_scenes: int = 0, max_new_tokens: int = 64) -> dict:
    """Run synthetic_report and synthetic_direct on the `scenes_ood.json` scenes (`max_scenes` 0:
    all) with one model, write `<out>/ood_summary.json` and say whether the goals are met."""
    from ferret.eval import synthetic_direct, synthetic_report

    out = Path(out)
    model = ["--model-path", str(model_path)] if model_path else []
    common = ["--data", str(data), "--split", SPLIT, "--max-scenes", str(max_scenes), "--seed", str(seed), *model]
    report = synthetic_report.main([*common, "--out", str(out / "report"), "--batch-size", str(batch_size),
                                    "--max-new-tokens", str(max_new_tokens), "--device", device, "--no-progress"])
    direct = synthetic_direct.main([*common, "--out", str(out / "direct")])
    grounding = report["summary"]["refcoco"]["acc@0.5"]
    naming = {k: direct["accuracy"].get(f"refer_{k}") for k in ("box", "point", "free_form")}
    summary = {
        "data": str(data), "model_path": None if model_path is None else str(model_path),
        "num_scenes": report["num_scenes"],
        "grounding_acc@0.5": grounding, "naming": naming, "yes_no_accuracy": direct["yes_no_accuracy"],
        "goals": GOALS,
        "meets": {"grounding": grounding >= GOALS["grounding_acc@0.5"],
                  "naming": all(v is not None and v >= GOALS["naming"] for v in naming.values())},
    }
    meta_path = Path(data) / "ood_meta.json"
    if meta_path.is_file():
        scenes = synthetic_report.load_scenes(data, max_scenes or None, SPLIT)
        summary["by_kind"] = breakdown(data, scenes, json.loads(meta_path.read_text())["scenes"],
                                       out / "report", direct)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def breakdown(data: str | Path, scenes: list[dict], metas: list[dict], report_dir: Path, direct: dict) -> dict:
    """Grounding Acc@0.5 (rescored from the RefCOCO predictions with its own scorer) and naming
    accuracy (box, point and free-form pooled) per canvas kind and per background kind."""
    from ferret.eval import refcoco
    from ferret.eval.common import collect_predictions

    kind_of = {m["image"]: m for m in metas}
    benchmark = report_dir / "benchmarks" / "finetune_synthetic_test.json"
    refexp_images = json.loads(benchmark.read_text())["images"]
    samples = refcoco.load_samples([str(benchmark)], str(data)).samples
    predictions = collect_predictions(report_dir / "refcoco")
    wrong = Counter(w["image"] for w in direct["wrong"] if w["check"].startswith("refer_"))
    out: dict = {}
    for key in ("size_kind", "background"):
        groups: dict[str, dict] = {}
        for sample in samples:
            if sample.sample_id in predictions and "error" not in predictions[sample.sample_id]:
                image = refexp_images[int(sample.sample_id.rsplit(":", 1)[1])]["file_name"]
                groups.setdefault(kind_of[image][key], {"pairs": []})["pairs"].append(
                    (sample, predictions[sample.sample_id]))
        for scene in scenes:
            group = groups.setdefault(kind_of[scene["image"]][key], {"pairs": []})
            group["refer"] = group.get("refer", 0) + 3 * len(scene["objects"])  # box, point, free-form
            group["refer_wrong"] = group.get("refer_wrong", 0) + wrong[Path(scene["image"]).name]
        out[key] = {
            kind: {"grounding_acc@0.5": round(refcoco.score(g["pairs"])["overall_accuracy"], 4),
                   "grounding_count": len(g["pairs"]),
                   "naming": round(1 - g.get("refer_wrong", 0) / g["refer"], 4) if g.get("refer") else None,
                   "naming_count": g.get("refer", 0)}
            for kind, g in sorted(groups.items())
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (images/, scenes_ood.json, ood_meta.json)")
    parser.add_argument("--n", type=int, default=60, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", metavar="DIR", default=None,
                        help="then run synthetic_report and synthetic_direct on all scenes, writing under DIR")
    parser.add_argument("--model-path", default=None, help="with --evaluate: model folder (default: the embedded model)")
    parser.add_argument("--device", default="auto", help="with --evaluate: device of synthetic_report")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be positive, got {args.n}")
    summary = generate_ood(args.out, args.n, args.seed)
    print(json.dumps(summary, indent=2))
    if args.evaluate:
        summary["evaluation"] = evaluate(args.out, args.evaluate, args.model_path, args.seed, device=args.device)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
