"""Ferret-Bench: referring description, referring reasoning and grounded conversation, rated by
a judge against reference answers (score = mean model rating / mean reference rating x 100).

    python -m ferret.eval.ferret_bench --model-path PATH --data ../shared/ferret_bench \
        --images coco/val2017 --out results/ferret_bench

`--data` is the benchmark folder (with refer_caption/, refer_reason/, ground_conv/ and
rule.json) or some of its category folders; each holds question.jsonl, context.jsonl and
answer.jsonl. Questions write regions as normalised boxes "[0.621, 0.082, 0.772, 0.132]";
they are asked as `[x1, y1, x2, y2] <region_fea>` on the 0-999 grid with the box as the
region. The judge (see ferret.eval.judge) is an OpenAI-compatible endpoint when
FERRET_JUDGE_URL is set, otherwise the offline heuristic, named in metrics.json["judge"].
Before review, answers are post-processed as released: boxes are dropped from referring
answers and rewritten as normalised 3-decimal boxes in grounded conversations.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from ferret.eval.common import (AnswerFn, EvalSample, EvalSetupError, LoadedSamples, task_parser,
                                append_jsonl, read_json_file, read_jsonl, require_samples, run_task, summary_line)
from ferret.eval.judge import (Judge, JudgeError, OfflineHeuristicJudge, ReviewRequest, build_review_prompt,
                               judge_from_env, normalized_boxes, parse_score_pair)
from ferret.eval.metrics import decode_grounded_boxes
from ferret.regions import Box

CATEGORY_FOLDERS = ("refer_caption", "refer_reason", "ground_conv")
REVIEWS_FILE = "reviews.jsonl"
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_NUMBER = r"\s*(\d+(?:\.\d+)?)\s*"
_NORM_BOX_TEXT = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_GRID_BOX_TEXT = re.compile(r"\[" + ",".join([r"\s*(\d+)\s*"] * 4) + r"\]")
MAX_CONSECUTIVE_JUDGE_FAILURES = 3


def category_folders(data_paths: list[str]) -> list[Path]:
    folders = []
    for raw in data_paths:
        path = Path(raw)
        if (path / "question.jsonl").is_file():
            folders.append(path)
        elif path.is_dir():
            folders += sorted(p for p in path.iterdir() if (p / "question.jsonl").is_file())
    return folders


def find_rule_file(data_paths: list[str], explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    for raw in data_paths:
        for candidate in (Path(raw) / "rule.json", Path(raw).parent / "rule.json"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no rule.json next to {data_paths}; pass --rule")


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the image header, None when it cannot be read (reported later)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


def question_with_regions(text: str, size: tuple[int, int] | None) -> tuple[str, tuple]:
    """Replace each normalised box in a question with a `<region>` placeholder and a pixel Box.

    Pixels are kept fractional so that the prompt's grid numbers are the released
    int(value x 1000). Without an image size the question is left as is (the image is missing
    and the sample will be reported as such)."""
    if size is None:
        return text, ()
    width, height = size
    regions = []

    def to_placeholder(match: re.Match) -> str:
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        regions.append(Box(x1 * width, y1 * height, x2 * width, y2 * height))
        return "<region>"

    return _NORM_BOX_TEXT.sub(to_placeholder, text), tuple(regions)


def load_samples(data_paths: list[str], images_dir: str) -> LoadedSamples:
    loaded = LoadedSamples(samples=[])
    folders = category_folders(data_paths)
    if not folders:
        raise EvalSetupError(f"no Ferret-Bench category folder (with question.jsonl) in {data_paths}")
    for folder in folders:
        try:
            questions = read_jsonl(folder / "question.jsonl")
            contexts = {c["question_id"]: c["text"] for c in read_jsonl(folder / "context.jsonl")}
            references = {a["question_id"]: a["text"] for a in read_jsonl(folder / "answer.jsonl")}
        except (FileNotFoundError, KeyError) as err:
            loaded.bad_annotations.append(f"{folder}: {err}")
            continue
        for question in questions:
            qid = question.get("question_id")
            try:
                if qid not in contexts or qid not in references:
                    raise KeyError(f"question {qid} has no context or reference answer")
                image = os.path.join(images_dir, Path(str(question["image"])).name)
                text, regions = question_with_regions(str(question["text"]), image_size(image))
            except (KeyError, TypeError, ValueError) as err:
                loaded.bad_annotations.append(f"{folder}/question.jsonl question {qid}: {err}")
                continue
            category = str(question["category"])
            loaded.samples.append(EvalSample(
                sample_id=f"{category}:{qid}", image=image, question=text, regions=regions,
                meta={"category": category, "question_id": qid, "question_text": question["text"],
                      "context": contexts[qid], "reference": references[qid]},
            ))
    return require_samples(loaded, "Ferret-Bench questions", data_paths)


def postprocess_answer(answer: str, category: str) -> str:
    """Released clean-up before review: referring answers lose their boxes; grounded answers get
    grid boxes rewritten as normalised boxes with three decimals (other brackets dropped)."""
    if category == "ground_conv":
        def normalise(match: re.Match) -> str:
            grid = _GRID_BOX_TEXT.fullmatch(match.group(0))
            if grid is None:
                return ""
            x1, y1, x2, y2 = (int(v) / 1000 for v in grid.groups())
            return f"[{x1:.3f}, {y1:.3f}, {x2:.3f}, {y2:.3f}]"
        return _BRACKETS.sub(normalise, answer)
    return re.sub(r" ?\[[^\[\]]*\]", "", answer)


def make_scorer(judge: Judge, rules: dict, out_dir: Path):
    """Score function: review every answered sample not yet reviewed by this judge (resumable
    reviews.jsonl), then summarise as the released script."""
    reviews_path = out_dir / REVIEWS_FILE

    def score(answered: list[tuple[EvalSample, dict]]) -> dict:
        reviews = {}
        if reviews_path.is_file():
            reviews = {r["id"]: r for r in read_jsonl(reviews_path) if r.get("judge") == judge.name}
        failures, judge_errors = 0, []
        for sample, record in answered:
            if sample.sample_id in reviews:
                continue
            if failures >= MAX_CONSECUTIVE_JUDGE_FAILURES:
                judge_errors.append({"id": sample.sample_id, "error": "not reviewed: judge kept failing"})
                continue
            category = sample.meta["category"]
            if category not in rules:
                raise EvalSetupError(f"rule.json has no review prompt for category {category!r}")
            request = ReviewRequest(category, sample.meta["context"], sample.meta["question_text"],
                                    sample.meta["reference"], postprocess_answer(record["text"], category))
            try:
                content = judge.review(build_review_prompt(request, rules[category]), request)
            except JudgeError as err:
                failures += 1
                judge_errors.append({"id": sample.sample_id, "error": str(err)})
                continue
            failures = 0
            review = {"id": sample.sample_id, "question_id": sample.meta["question_id"], "category": category,
                      "judge": judge.name, "content": content, "scores": parse_score_pair(content),
                      "answer1": request.reference_answer, "answer2": request.model_answer}
            append_jsonl(reviews_path, [review])
            reviews[sample.sample_id] = review
        return summarize_reviews([reviews[s.sample_id] for s, _ in answered if s.sample_id in reviews],
                                 judge.name, judge_errors, answered)

    return score


def summarize_reviews(reviews: list[dict], judge_name: str, judge_errors: list, answered) -> dict:
    """Per category and overall: mean(model rating) / mean(reference rating) x 100, one decimal
    (released summarize script). Reviews without two scores are listed and left out."""
    pairs: dict[str, list] = defaultdict(list)
    unparsable_reviews = []
    for review in reviews:
        if review["scores"] is None:
            unparsable_reviews.append({"id": review["id"], "content": review["content"][:300]})
            continue
        pairs[review["category"]].append(review["scores"])
        pairs["all"].append(review["scores"])
    scores, ratings = {}, {}
    for category, values in sorted(pairs.items()):
        mean_ref = sum(v[0] for v in values) / len(values)
        mean_model = sum(v[1] for v in values) / len(values)
        ratings[category] = [round(mean_ref, 3), round(mean_model, 3)]
        scores[category] = round(mean_model / mean_ref * 100, 1) if mean_ref else 0.0
    empty = [{"id": s.sample_id, "text": r["text"]} for s, r in answered if not r["text"].strip()]
    return {
        "metric": "mean model rating / mean reference rating x 100",
        "judge": judge_name,
        "scores": scores,
        "mean_ratings_reference_model": ratings,
        "num_reviews": sum(len(v) for k, v in pairs.items() if k != "all"),
        "num_unparsable_reviews": len(unparsable_reviews),
        "unparsable_reviews": unparsable_reviews,
        "judge_errors": judge_errors,
        "num_unparsable": len(empty),
        "unparsable": empty,
    }


def boxes_for_picture(sample: EvalSample, record: dict) -> tuple[list, list]:
    width, height = record["width"], record["height"]
    pred = [list(d.box) for d in decode_grounded_boxes(record["text"], width, height)]
    true = [[b[0] * width, b[1] * height, b[2] * width, b[3] * height]
            for b in normalized_boxes(sample.meta["reference"])]
    true += [list(r.coords) for r in sample.regions]
    return pred, true


def build_parser() -> argparse.ArgumentParser:
    parser = task_parser(__doc__, data_help="Ferret-Bench folder or category folders",
                         images_help="folder of the COCO val2017 images")
    parser.add_argument("--rule", default=None, help="rule.json with the review prompts (default: found next to --data)")
    parser.add_argument("--offline-judge", action="store_true",
                        help="use the offline heuristic judge even when FERRET_JUDGE_URL is set")
    return parser


def main(argv: list[str] | None = None, answer_fn: AnswerFn | None = None, judge: Judge | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if judge is None:
        judge = OfflineHeuristicJudge() if args.offline_judge else judge_from_env()
    rules = read_json_file(find_rule_file(args.data, args.rule))
    loaded = load_samples(args.data, args.images)
    scorer = make_scorer(judge, rules, Path(args.out))
    metrics = run_task("ferret_bench", loaded, scorer, args, answer_fn=answer_fn, boxes_fn=boxes_for_picture)
    print(f"judge: {metrics['judge']}")
    print(summary_line(metrics, ["num_answered", "num_reviews", "missing_images"]))
    for category, value in metrics["scores"].items():
        print(f"  {category}: {value}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
