"""Machinery shared by every benchmark: samples, sharding, resumable jsonl predictions,
batched generation with a progress bar, visualisation and the task runner.

A task module only turns its annotation files into `EvalSample`s and scores
`(sample, prediction)` pairs; `run_task` does the rest:

    out/predictions_<k>_of_<n>.jsonl   one record per answered sample (appended, resumable)
    out/metrics.json                   metrics over every prediction file in `out`
    out/visualize/<id>.png             `--visualize N` pictures with predicted / true boxes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ferret.data.errors import DataFormatError

PREDICTIONS_GLOB = "predictions_*.jsonl"
METRICS_FILE = "metrics.json"


class EvalSetupError(ValueError):
    """The evaluation cannot start: missing model, unreadable annotation file, bad options."""


@dataclass
class EvalSample:
    """One question to ask: an image file, a question (with `<region>` placeholders filled
    from `regions`, in order) and whatever the scorer needs in `meta`."""

    sample_id: str
    image: str
    question: str
    regions: tuple = ()
    meta: dict = field(default_factory=dict)


@dataclass
class LoadedSamples:
    """Samples read from annotation files plus the entries that could not be used."""

    samples: list[EvalSample]
    bad_annotations: list[str] = field(default_factory=list)


def existing_files(data_paths: Iterable[str], loaded: LoadedSamples) -> Iterable[str]:
    """The annotation files that exist; each missing one is recorded in `loaded`, not fatal."""
    for path in data_paths:
        if Path(path).is_file():
            yield path
        else:
            loaded.bad_annotations.append(f"annotation file not found: {path}")


def require_samples(loaded: LoadedSamples, what: str, data_paths: Sequence[str]) -> LoadedSamples:
    """`loaded` when it has samples; an EvalSetupError naming the first problems otherwise."""
    if not loaded.samples:
        raise EvalSetupError(f"no usable {what} in {list(data_paths)}: {loaded.bad_annotations[:3]}")
    return loaded


# An answer function takes a batch of (PIL image, question, regions) and returns one answer
# text per item; `FerretChat.ask_batch` behind it in real runs, a fake in unit tests.
AnswerFn = Callable[[Sequence[tuple[Any, str, tuple]]], list[str]]


# ----------------------------------------------------------------------------- sharding

def resolve_shard(num_chunks: int | None, chunk_idx: int | None,
                  environ: dict | None = None) -> tuple[int, int]:
    """(num_chunks, chunk_idx): the explicit options, else torchrun's WORLD_SIZE / RANK,
    else a single chunk."""
    environ = os.environ if environ is None else environ
    if num_chunks is None:
        num_chunks = int(environ.get("WORLD_SIZE", 1))
        if chunk_idx is None:
            chunk_idx = int(environ.get("RANK", 0))
    chunk_idx = 0 if chunk_idx is None else chunk_idx
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise EvalSetupError(f"chunk index {chunk_idx} is not in [0, {num_chunks})")
    return num_chunks, chunk_idx


def shard(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Contiguous chunk `chunk_idx` of `num_chunks` (ceil-sized chunks, the released split)."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise EvalSetupError(f"chunk index {chunk_idx} is not in [0, {num_chunks})")
    size = max(1, math.ceil(len(items) / num_chunks))
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def batched(items: Sequence, batch_size: int) -> Iterable[list]:
    if batch_size < 1:
        raise EvalSetupError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield list(items[start:start + batch_size])


# ----------------------------------------------------------------------------- jsonl

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a jsonl file. A torn last line (a run killed mid-write) is dropped;
    a broken line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jsonl file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise EvalSetupError(f"malformed json in {path} line {number}: {err.msg}") from err
    return records


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, creating the folder; atomically, so a reader never sees half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # several ranks may write the same file
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def collect_predictions(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Every record of every prediction file in `out_dir`, by sample id; a later record of
    the same id (a retry after an error) replaces an earlier one."""
    by_id: dict[str, dict] = {}
    for path in sorted(Path(out_dir).glob(PREDICTIONS_GLOB)):
        for record in read_jsonl(path):
            if "id" in record:
                by_id[str(record["id"])] = record
    return by_id


def read_json_file(path: str | os.PathLike) -> Any:
    """json.load with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalSetupError(f"malformed json in {path} at line {err.lineno}: {err.msg}") from err


def read_records(data_paths: Iterable[str], reader: Callable[..., list], loaded: LoadedSamples
                 ) -> Iterable[tuple[str, Any]]:
    """(file, record) for every usable entry of the annotation files, read by a
    `ferret.data.formats` reader. Missing files and unusable entries are recorded in `loaded`
    and skipped; a file that is not json or not of the reader's format stops the evaluation."""
    for path in existing_files(data_paths, loaded):
        try:
            records = reader(path, bad_entries=loaded.bad_annotations)
        except DataFormatError as err:
            raise EvalSetupError(str(err)) from err
        for record in records:
            yield path, record


# ----------------------------------------------------------------------------- generation

@dataclass
class GenerationStats:
    answered: int = 0
    skipped_existing: int = 0
    errors: int = 0


def open_image(path: str):
    """The RGB image at `path`; a missing or unreadable file raises a ValueError subclass or
    FileNotFoundError naming it."""
    from ferret.processing import load_image

    return load_image(path)


def run_generation(samples: Sequence[EvalSample], answer_fn: AnswerFn, predictions_path: str | os.PathLike,
                   batch_size: int = 1, progress: bool = True, desc: str = "eval") -> GenerationStats:
    """Answer every sample whose id has no answer in `predictions_path` yet, `batch_size` at a
    time, appending one record per sample. A sample whose image cannot be read, or that the
    model rejects (bad region), gets an `error` record instead of stopping the run; errors are
    retried on the next resume."""
    stats = GenerationStats()
    done = set()
    if Path(predictions_path).is_file():
        done = {str(r["id"]) for r in read_jsonl(predictions_path) if "id" in r and "error" not in r}
    todo = [s for s in samples if s.sample_id not in done]
    stats.skipped_existing = len(samples) - len(todo)
    bar = tqdm(total=len(todo), desc=desc, disable=not progress, unit="q")
    for batch in batched(todo, batch_size):
        records: list[dict] = []
        ready: list[tuple[EvalSample, Any]] = []
        for sample in batch:
            try:
                ready.append((sample, open_image(sample.image)))
            except (OSError, ValueError) as err:
                records.append(_error_record(sample, "missing_image", err))
        records += _answer_batch(ready, answer_fn)
        stats.errors += sum("error" in r for r in records)
        stats.answered += sum("error" not in r for r in records)
        append_jsonl(predictions_path, records)
        bar.update(len(batch))
    bar.close()
    return stats


def _answer_batch(ready: list[tuple[EvalSample, Any]], answer_fn: AnswerFn) -> list[dict]:
    if not ready:
        return []
    try:
        texts = answer_fn([(image, s.question, tuple(s.regions)) for s, image in ready])
    except ValueError as err:
        if len(ready) == 1:
            return [_error_record(ready[0][0], "rejected_input", err)]
        # One bad item must not sink its batch: answer them one by one.
        return [r for item in ready for r in _answer_batch([item], answer_fn)]
    if len(texts) != len(ready):
        raise RuntimeError(f"answer function returned {len(texts)} answers for {len(ready)} questions")
    return [{"id": s.sample_id, "image": s.image, "question": s.question, "text": text,
             "width": image.width, "height": image.height}
            for (s, image), text in zip(ready, texts)]


def _error_record(sample: EvalSample, kind: str, err: Exception) -> dict:
    return {"id": sample.sample_id, "image": sample.image, "question": sample.question,
            "error": kind, "detail": str(err)}


# ----------------------------------------------------------------------------- model

def chat_answer_fn(chat, max_new_tokens: int = 128, temperature: float = 0.0) -> AnswerFn:
    """Answer function backed by `FerretChat.ask_batch` (one padded forward per batch)."""
    def answer(items):
        answers = chat.ask_batch(list(items), temperature=temperature, max_new_tokens=max_new_tokens)
        return [a.text for a in answers]
    return answer


def load_answer_fn(args: argparse.Namespace) -> AnswerFn:
    """FerretChat from `--model-path`, or the embedded model when none is given."""
    from ferret.chat import FerretChat

    device = args.device
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch
        if torch.cuda.is_available():  # one GPU per torchrun rank
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if args.model_path is not None and not Path(args.model_path).exists():
        raise FileNotFoundError(f"model path not found: {args.model_path}")
    try:
        chat = FerretChat.from_pretrained(model_path=args.model_path, load_4bit=args.load_4bit,
                                          load_8bit=args.load_8bit, device=device)
    except (FileNotFoundError, ValueError, OSError) as err:
        if args.model_path is None:
            raise EvalSetupError(f"no --model-path given and no embedded model could be loaded: {err}") from err
        raise
    return chat_answer_fn(chat, max_new_tokens=args.max_new_tokens, temperature=args.temperature)


# ----------------------------------------------------------------------------- visualisation

PRED_COLOUR = (30, 90, 255)
TRUE_COLOUR = (20, 170, 60)


def draw_boxes(image, pred_boxes: Sequence[Sequence[float]], true_boxes: Sequence[Sequence[float]],
               caption: str = ""):
    """A copy of `image` with true boxes (green) and predicted boxes (blue) and a caption."""
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    for boxes, colour in ((true_boxes, TRUE_COLOUR), (pred_boxes, PRED_COLOUR)):
        for box in boxes:
            x1, y1, x2, y2 = (float(v) for v in box)
            draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=2)
    if caption:
        draw.rectangle([0, 0, canvas.width, 12], fill=(0, 0, 0))
        draw.text((2, 0), caption[:200], fill=(255, 255, 255))
    return canvas


def safe_file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:120] or "sample"


# ----------------------------------------------------------------------------- runner

# Scores (sample, prediction record) pairs of answered samples -> metrics dict.
ScoreFn = Callable[[list[tuple[EvalSample, dict]]], dict]
# (sample, prediction record) -> (predicted pixel boxes, true pixel boxes) for pictures.
BoxesFn = Callable[[EvalSample, dict], tuple[list, list]]


def task_parser(doc: str, data_help: str, images_help: str) -> argparse.ArgumentParser:
    """Parser of a task command: its docstring's first line as description, the common options."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_common_args(parser, data_help, images_help)
    return parser


def add_common_args(parser: argparse.ArgumentParser, data_help: str, images_help: str) -> None:
    parser.add_argument("--model-path", default=None,
                        help="model folder; default: the embedded model")
    parser.add_argument("--data", nargs="+", required=True, help=data_help)
    parser.add_argument("--images", required=True, help=images_help)
    parser.add_argument("--out", required=True, help="output folder (predictions, metrics, pictures)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-chunks", type=int, default=None,
                        help="split the samples into this many chunks (default: WORLD_SIZE or 1)")
    parser.add_argument("--chunk-idx", type=int, default=None, help="which chunk to run (default: RANK or 0)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="write N pictures with predicted and true boxes")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--score-only", action="store_true",
                        help="no generation: score the predictions already in --out")
    parser.add_argument("--no-progress", action="store_true")


def run_task(task: str, loaded: LoadedSamples, score_fn: ScoreFn, args: argparse.Namespace,
             answer_fn: AnswerFn | None = None, boxes_fn: BoxesFn | None = None) -> dict:
    """Generate (this shard, resumable), score everything answered so far, write metrics."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = loaded.samples[:args.limit] if args.limit is not None else loaded.samples
    num_chunks, chunk_idx = resolve_shard(args.num_chunks, args.chunk_idx)
    mine = shard(samples, num_chunks, chunk_idx)
    predictions_path = out_dir / f"predictions_{chunk_idx}_of_{num_chunks}.jsonl"

    stats = GenerationStats()
    started = time.perf_counter()
    if not args.score_only and mine:
        if answer_fn is None:
            answer_fn = load_answer_fn(args)
        stats = run_generation(mine, answer_fn, predictions_path, batch_size=args.batch_size,
                               progress=not args.no_progress, desc=f"{task} {chunk_idx + 1}/{num_chunks}")
    generation_seconds = time.perf_counter() - started

    predictions = collect_predictions(out_dir)
    answered = [(s, predictions[s.sample_id]) for s in samples
                if s.sample_id in predictions and "error" not in predictions[s.sample_id]]
    failed = [predictions[s.sample_id] for s in samples
              if s.sample_id in predictions and "error" in predictions[s.sample_id]]
    metrics = {
        "task": task,
        "model_path": args.model_path,
        "num_samples": len(samples),
        "num_answered": len(answered),
        "complete": len(answered) + len(failed) == len(samples),
        "missing_images": sum(r["error"] == "missing_image" for r in failed),
        "rejected_inputs": sum(r["error"] != "missing_image" for r in failed),
        "bad_annotations": len(loaded.bad_annotations),
        "errors": [{"id": r["id"], "error": r["error"], "detail": r.get("detail", "")} for r in failed]
        + [{"id": None, "error": "bad_annotation", "detail": d} for d in loaded.bad_annotations],
        "this_run": {"chunk": f"{chunk_idx}/{num_chunks}", "answered": stats.answered,
                     "skipped_existing": stats.skipped_existing, "errors": stats.errors,
                     "seconds": round(generation_seconds, 3)},
    }
    metrics.update(score_fn(answered))
    write_json(out_dir / METRICS_FILE, metrics)

    if args.visualize and boxes_fn is not None:
        write_visualizations(mine, predictions, boxes_fn, out_dir / "visualize", args.visualize)
    return metrics


def write_visualizations(samples: Sequence[EvalSample], predictions: dict[str, dict], boxes_fn: BoxesFn,
                         folder: Path, limit: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sample in samples:
        if len(written) >= limit:
            break
        record = predictions.get(sample.sample_id)
        if record is None or "error" in record:
            continue
        pred_boxes, true_boxes = boxes_fn(sample, record)
        canvas = draw_boxes(open_image(sample.image), pred_boxes, true_boxes, caption=record.get("text", ""))
        path = folder / f"{safe_file_name(sample.sample_id)}.png"
        canvas.save(path)
        written.append(path)
    return written


def summary_line(metrics: dict, keys: Sequence[str]) -> str:
    shown = [f"{k}={metrics[k]:.4f}" if isinstance(metrics.get(k), float) else f"{k}={metrics.get(k)}"
             for k in keys if k in metrics]
    return " ".join(shown)
