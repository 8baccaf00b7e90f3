"""Judges for Ferret-Bench: rate a reference answer (1) and the model's answer (2) from 1 to 10.

* `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint (GPT-4 in the paper), given
  the released review prompt of the question's category (rule.json). Configured from the
  environment by `judge_from_env`: FERRET_JUDGE_URL (base URL, e.g. https://api.openai.com/v1),
  FERRET_JUDGE_MODEL (default gpt-4-0314), FERRET_JUDGE_API_KEY (or OPENAI_API_KEY).
* `OfflineHeuristicJudge`: no network. A deterministic stand-in so the pipeline runs anywhere:
  the reference gets 10, the model 1 + 9 x (content-word F1 with the reference, averaged with
  the box match for grounded answers). It is NOT GPT-4 and its numbers are not comparable to
  the paper's; every output that uses it is labelled `OFFLINE_JUDGE_NAME`.

Both return the review text in the released format: a first line "<score1> <score2>", then an
explanation; `parse_score_pair` reads it back.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Protocol

from ferret.eval.metrics import box_iou

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
OFFLINE_JUDGE_NAME = "offline-heuristic (not GPT-4)"
DEFAULT_JUDGE_MODEL = "gpt-4-0314"


class JudgeError(RuntimeError):
    """The judge endpoint failed (after retries) or answered something unusable."""


@dataclass(frozen=True)
class ReviewRequest:
    """What a judge sees: the category's rule, the image context, question and both answers."""

    category: str
    context: str
    question: str
    reference_answer: str
    model_answer: str


def build_review_prompt(request: ReviewRequest, rule: dict) -> str:
    """The released review message: context, question, the two answers and the category prompt."""
    role = rule["role"]
    return (f"[Context]\n{request.context}\n\n"
            f"[Question]\n{request.question}\n\n"
            f"[{role} 1]\n{request.reference_answer}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{request.model_answer}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def parse_score_pair(review: str) -> tuple[float, float] | None:
    """Scores from the review's first line ("8 6" or "8, 6"); None when it is not two numbers."""
    first_line = (review or "").strip().split("\n")[0].replace(",", " ")
    parts = first_line.split()
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


class Judge(Protocol):
    name: str

    def review(self, prompt: str, request: ReviewRequest) -> str: ...


class OpenAIJudge:
    """Chat-completions client (httpx) with retries; temperature 0.2 as released."""

    def __init__(self, base_url: str, model: str = DEFAULT_JUDGE_MODEL, api_key: str | None = None,
                 temperature: float = 0.2, max_tokens: int = 1024, timeout_s: float = 120.0,
                 retries: int = 3, retry_wait_s: float = 1.0):
        if not base_url:
            raise ValueError("the judge needs a base URL (FERRET_JUDGE_URL)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.name = f"openai-compatible:{model}"

    def review(self, prompt: str, request: ReviewRequest | None = None) -> str:
        import httpx

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}
        last_error = ""
        for attempt in range(self.retries):
            try:
                response = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except httpx.HTTPError as err:
                last_error = f"{type(err).__name__}: {err}"
            else:
                status = response.status_code
                if status < 400:
                    try:
                        return response.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        raise JudgeError(f"judge endpoint {self.url} sent an unexpected reply: "
                                         f"{response.text[:200]}") from err
                if status != 429 and status < 500:  # bad key, model or request: retrying will not help
                    raise JudgeError(f"judge endpoint {self.url} answered HTTP {status}: {response.text[:200]}")
                last_error = f"HTTP {status}"
            if attempt + 1 < self.retries:
                time.sleep(self.retry_wait_s * (2 ** attempt))
        raise JudgeError(f"judge endpoint {self.url} failed after {self.retries} tries: {last_error}")


_WORD = re.compile(r"[a-z0-9]+")
_NORM_BOX = re.compile(r"\[\s*([01](?:\.\d+)?)\s*,\s*([01](?:\.\d+)?)\s*,\s*([01](?:\.\d+)?)\s*,\s*([01](?:\.\d+)?)\s*\]")
_STOPWORDS = frozenset(
    "a an the and or of in on at to is are was were be been it its this that these those with for as by "
    "from there their they he she his her them which who what while also can could may might would will "
    "into onto near next than then some any".split())


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and not w.replace(".", "").isdigit()]


def word_f1(candidate: str, reference: str) -> float:
    """Bag-of-content-words F1 between two texts (0 when either is empty)."""
    cand, ref = content_words(candidate), content_words(reference)
    if not cand or not ref:
        return 0.0
    remaining = list(ref)
    common = 0
    for w in cand:
        if w in remaining:
            remaining.remove(w)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def normalized_boxes(text: str) -> list[list[float]]:
    return [[float(v) for v in m.groups()] for m in _NORM_BOX.finditer(text)]


def box_match(candidate: str, reference: str) -> float:
    """Mean over the reference's normalised boxes of their best IoU with the candidate's boxes."""
    ref_boxes, cand_boxes = normalized_boxes(reference), normalized_boxes(candidate)
    if not ref_boxes:
        return 1.0 if not cand_boxes else 0.0
    if not cand_boxes:
        return 0.0
    return sum(max(box_iou(c, r) for c in cand_boxes) for r in ref_boxes) / len(ref_boxes)


class OfflineHeuristicJudge:
    """Deterministic, offline judge; labelled as such. See the module docstring."""

    name = OFFLINE_JUDGE_NAME

    def review(self, prompt: str, request: ReviewRequest) -> str:
        text_score = word_f1(request.model_answer, request.reference_answer)
        if request.category == "ground_conv":
            quality = 0.5 * text_score + 0.5 * box_match(request.model_answer, request.reference_answer)
        else:
            quality = text_score
        model_score = round(1 + 9 * quality, 2)
        return (f"10 {model_score}\n{OFFLINE_JUDGE_NAME}: reference fixed at 10; model = 1 + 9 x "
                f"quality, quality = {quality:.3f} (content-word F1 with the reference"
                f"{', averaged with box IoU match' if request.category == 'ground_conv' else ''}).")


def judge_from_env(environ: dict | None = None) -> Judge:
    """OpenAIJudge when FERRET_JUDGE_URL is set, otherwise the offline heuristic judge."""
    environ = os.environ if environ is None else environ
    url = environ.get("FERRET_JUDGE_URL")
    if not url:
        return OfflineHeuristicJudge()
    return OpenAIJudge(url, model=environ.get("FERRET_JUDGE_MODEL", DEFAULT_JUDGE_MODEL),
                       api_key=environ.get("FERRET_JUDGE_API_KEY") or environ.get("OPENAI_API_KEY"))
