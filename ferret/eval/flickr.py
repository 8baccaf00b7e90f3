"""Flickr30k Entities phrase grounding: recall@1/5/10 under the any-box and merged-box protocols.

    python -m ferret.eval.flickr --model-path PATH --data final_flickr_separateGT_test.json \
        --images flickr30k/test --out results/flickr

Annotation file: the released MDETR-style json. Each entry of `images` is one caption
(`caption`, `file_name`, `width`, `height`, `tokens_positive_eval`: one list of character
spans per entity phrase); `annotations` hold its boxes (`image_id`, `bbox` in COCO xywh,
`tokens_positive` spans telling which phrase a box belongs to). The file is read by
`ferret.data.formats.load_flickr`; an unusable caption is counted, not fatal.

Protocol (released): ask "What are the locations of <objs>?" with the caption's phrases
(lower case, commas removed) joined by ", "; the predicted boxes of a phrase are the boxes the
answer writes after that same phrase (compared without case and punctuation), in order. A
phrase is recalled at k when one of its first k predicted boxes has IoU >= 0.5 with one of the
phrase's true boxes (any-box) or with the box enclosing them all (merged-box, the number the
paper reports). A phrase the answer does not ground is a miss. Give the separateGT json to
get both protocols (the mergedGT json already holds one merged box per phrase, so there the
two coincide); `--entities` adds recall per phrase type from the Flickr30k Entities sentences.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from ferret.data.formats import FlickrRecord, load_flickr
from ferret.eval.common import (AnswerFn, EvalSample, LoadedSamples, read_records, require_samples, run_task,
                                summary_line, task_parser)
from ferret.eval.metrics import clip_box, decode_grounded_boxes, hit_at_k, merge_boxes, phrases_match, recall

TOP_K = (1, 5, 10)
PROTOCOLS = ("any_box", "merged_box")
# An annotated phrase in a Flickr30k Entities sentence file: "[/EN#18/people/other A man]".
_ENTITY = re.compile(r"\[/EN#(\d+)((?:/[\w-]+)+) ([^\]]+)\]")


def read_sentence_phrases(path: str | os.PathLike) -> list[list[dict]]:
    """Per sentence of a Flickr30k Entities `Sentences/<image>.txt`: its phrases with their
    text, id and coarse types (people, clothing, bodyparts, animals, vehicles, ...)."""
    sentences = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            sentences.append([{"phrase": m.group(3), "phrase_id": m.group(1), "types": m.group(2).strip("/").split("/")}
                              for m in _ENTITY.finditer(line)])
    return sentences


def load_samples(data_paths: list[str], images_dir: str, entities_dir: str | None = None) -> LoadedSamples:
    """One sample per caption of the `ferret.data.formats.load_flickr` records; with
    `entities_dir` (the Flickr30k Entities folder with Sentences/) each phrase also gets its
    coarse types, for the per-type recall. A caption that cannot be scored is counted, not fatal."""
    loaded = LoadedSamples(samples=[])
    for path, record in read_records(data_paths, load_flickr, loaded):
        try:
            sample = _caption_sample(record, images_dir)
            if entities_dir is not None:
                _add_phrase_types(sample, record, entities_dir)
        except (ValueError, OSError) as err:
            loaded.bad_annotations.append(f"{path} image entry {record.image_id}: {err}")
            continue
        loaded.samples.append(sample)
    return require_samples(loaded, "Flickr30k samples", data_paths)


def _caption_sample(record: FlickrRecord, images_dir: str) -> EvalSample:
    phrases = []
    for index, phrase in enumerate(record.entities):
        text = record.entity_text(index)
        boxes = [clip_box(box, record.width, record.height) for box in record.entity_boxes(index)]
        if not boxes:
            raise ValueError(f"phrase {text!r} has no box")
        phrases.append({"phrase": phrase, "text": text, "boxes": boxes})
    if not phrases:
        raise ValueError("caption has no phrase to ground")
    extras = record.extras
    sample_id = (f"{extras['original_img_id']}_{extras['sentence_id']}"
                 if "original_img_id" in extras and "sentence_id" in extras else str(record.image_id))
    return EvalSample(
        sample_id=sample_id,
        image=os.path.join(images_dir, record.file_name),
        question=record.question,
        meta={"caption": record.caption, "phrases": phrases, "width": record.width, "height": record.height},
    )


def _add_phrase_types(sample: EvalSample, record: FlickrRecord, entities_dir: str) -> None:
    try:
        image_name, sentence = record.extras["original_img_id"], int(record.extras["sentence_id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("needs 'original_img_id' and an integer 'sentence_id' to find its "
                         "Flickr30k Entities sentence") from None
    sentences_path = Path(entities_dir) / "Sentences" / f"{image_name}.txt"
    sentences = read_sentence_phrases(sentences_path)
    if not 0 <= sentence < len(sentences):
        raise ValueError(f"sentence {sentence} is not in {sentences_path} ({len(sentences)} sentences)")
    annotated = sentences[sentence]
    for phrase in sample.meta["phrases"]:
        match = next((a for a in annotated if a["phrase"] == phrase["text"]), None)
        if match is None:
            raise ValueError(f"phrase {phrase['text']!r} is not in the Flickr30k Entities sentence")
        phrase["types"] = match["types"]


def predicted_boxes_by_phrase(sample: EvalSample, record: dict) -> list[list[list[int]]]:
    """For each phrase of the caption, the answer's boxes written after that phrase, in order."""
    decoded = decode_grounded_boxes(record["text"], sample.meta["width"], sample.meta["height"])
    return [[list(d.box) for d in decoded if phrases_match(d.phrase, p["phrase"])]
            for p in sample.meta["phrases"]]


def score(answered: list[tuple[EvalSample, dict]]) -> dict:
    # hits[(protocol, k)][phrase type] -> hit per phrase; "all" holds every phrase
    hits = {(protocol, k): defaultdict(list) for protocol in PROTOCOLS for k in TOP_K}
    unparsable, ungrounded = [], 0
    for sample, record in answered:
        preds = predicted_boxes_by_phrase(sample, record)
        if not decode_grounded_boxes(record["text"], sample.meta["width"], sample.meta["height"]):
            unparsable.append({"id": sample.sample_id, "text": record["text"]})
        for phrase, pred in zip(sample.meta["phrases"], preds):
            ungrounded += not pred
            targets = {"any_box": phrase["boxes"], "merged_box": [merge_boxes(phrase["boxes"])]}
            for protocol in PROTOCOLS:
                for k in TOP_K:
                    hit = hit_at_k(pred, targets[protocol], k)
                    for group in ["all", *phrase.get("types", [])]:
                        hits[(protocol, k)][group].append(hit)
    metrics = {
        "metric": "phrase recall@k at IoU 0.5",
        "recall": {protocol: {f"R@{k}": recall(hits[(protocol, k)]["all"]) for k in TOP_K} for protocol in PROTOCOLS},
        "num_phrases": len(hits[("any_box", 1)]["all"]),
        "num_ungrounded_phrases": ungrounded,
        "num_unparsable": len(unparsable),
        "unparsable": unparsable,
    }
    types = sorted(t for t in hits[("merged_box", 1)] if t != "all")
    if types:
        metrics["recall_by_type"] = {protocol: {t: {f"R@{k}": recall(hits[(protocol, k)][t]) for k in TOP_K}
                                                for t in types} for protocol in PROTOCOLS}
    return metrics


def boxes_for_picture(sample: EvalSample, record: dict) -> tuple[list, list]:
    decoded = decode_grounded_boxes(record["text"], sample.meta["width"], sample.meta["height"])
    return [list(d.box) for d in decoded], [b for p in sample.meta["phrases"] for b in p["boxes"]]


def build_parser() -> argparse.ArgumentParser:
    parser = task_parser(__doc__, data_help="Flickr30k Entities json (final_flickr_*GT_test.json)",
                         images_help="folder of the Flickr30k images")
    parser.add_argument("--entities", default=None,
                        help="Flickr30k Entities folder (Sentences/*.txt) for recall per phrase type")
    return parser


def main(argv: list[str] | None = None, answer_fn: AnswerFn | None = None) -> dict:
    args = build_parser().parse_args(argv)
    loaded = load_samples(args.data, args.images, args.entities)
    metrics = run_task("flickr", loaded, score, args, answer_fn=answer_fn, boxes_fn=boxes_for_picture)
    print(summary_line(metrics, ["num_answered", "num_phrases", "num_unparsable", "missing_images"]))
    for protocol, values in metrics["recall"].items():
        print(f"  {protocol}: " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
