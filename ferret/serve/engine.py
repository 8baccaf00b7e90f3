"""The model behind a worker: a FerretChat plus what serving needs around it.

``ChatEngine.stream(request)`` yields the answer text accumulated so far, piece by piece;
``check(request)`` raises RequestError for a question/region mismatch before any work starts;
``memory_bytes`` is the loaded model's footprint (what 4-bit / 8-bit loading saves).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ferret.constants import IMAGE_TOKEN, REGION_TOKEN
from ferret.processing import build_question
from ferret.regions import Box
from ferret.serve.protocol import GenerateRequest, PendingMask, RequestError, Turn, UnknownModelError

__all__ = ["ChatEngine", "chat_history", "default_model_name", "format_bytes"]


def default_model_name(model_path: str | os.PathLike | None) -> str:
    """A model's public name: its folder name (``parent_checkpoint-N`` for trainer checkpoints)."""
    if model_path is None:
        return "ferret-default"
    path = Path(model_path).expanduser().resolve()
    if path.name.startswith("checkpoint-"):
        return f"{path.parent.name}_{path.name}"
    return path.name


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _checkable(regions: list) -> list:
    """Regions for a text-only check: a mask not decoded yet stands in as a box (same text shape)."""
    return [Box(0, 0, 1, 1) if isinstance(r, PendingMask) else r for r in regions]


def _check_literal_tokens(text: str, where: str) -> None:
    if REGION_TOKEN in text or IMAGE_TOKEN in text:
        raise RequestError(f"{where} contains a literal {REGION_TOKEN} or {IMAGE_TOKEN}; send regions as region objects")


def chat_history(turns: list[Turn], image_size: tuple[int, int]):
    """Earlier turns as a ``ferret.chat.ChatHistory`` (None when there are none); RequestError
    names the turn whose question and regions do not fit together. The history carries the
    regions, not their masks: FerretChat builds the masks once the request fits the context."""
    from ferret.chat import ChatHistory

    if not turns:
        return None
    width, height = image_size
    texts, regions = [], []
    for i, turn in enumerate(turns):
        _check_literal_tokens(turn.question, f"history[{i}].question")
        _check_literal_tokens(turn.answer, f"history[{i}].answer")
        try:
            texts.append((build_question(turn.question, _checkable(turn.regions), width, height), turn.answer))
        except ValueError as error:
            raise RequestError(f"history[{i}]: invalid question/regions: {error}") from None
        regions += turn.regions
    return ChatHistory(turns=tuple(texts), region_masks=tuple(regions), image_size=(width, height))


class ChatEngine:
    """Adapts ``ferret.chat.FerretChat`` to the serving protocol."""

    def __init__(self, chat, model_name: str, quantization: str | None = None):
        self.chat = chat
        self.model_name = model_name
        self.quantization = quantization

    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike | None = None,
        load_4bit: bool = False,
        load_8bit: bool = False,
        device: str = "auto",
        model_name: str | None = None,
    ) -> "ChatEngine":
        from ferret.chat import FerretChat

        chat = FerretChat.from_pretrained(model_path, load_4bit=load_4bit, load_8bit=load_8bit, device=device)
        quantization = "4bit" if load_4bit else "8bit" if load_8bit else None
        return cls(chat, model_name or default_model_name(model_path), quantization)

    @property
    def model(self):
        return self.chat.model

    @property
    def memory_bytes(self) -> int | None:
        model = self.model
        if hasattr(model, "get_memory_footprint"):
            return int(model.get_memory_footprint())
        return None

    def check(self, request: GenerateRequest) -> None:
        """Refuse requests whose question and regions do not fit together (before streaming)."""
        if request.model is not None and request.model != self.model_name:
            raise UnknownModelError(f"this worker serves {self.model_name!r}, not {request.model!r}")
        self.history(request)
        _check_literal_tokens(request.question, "the question")
        try:
            build_question(request.question, _checkable(request.regions), *request.image.size)
        except ValueError as error:
            raise RequestError(f"invalid question/regions: {error}") from None

    @staticmethod
    def history(request: GenerateRequest):
        return chat_history(request.history, request.image.size)

    def stream(self, request: GenerateRequest, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the answer accumulated so far after each decoded piece; stops within one decoding
        step once ``cancel`` is set."""
        text = ""
        for piece in self.chat.stream(
            request.image,
            request.question,
            regions=request.regions,
            history=self.history(request),
            temperature=request.temperature,
            top_p=request.top_p,
            max_new_tokens=request.max_new_tokens,
            cancel=cancel,
        ):
            if piece:  # the decoder may emit empty pieces while a multi-byte character is incomplete
                text += piece
                yield text

    def grounding(self, text: str, request: GenerateRequest):
        """The answer's phrases with their boxes in the request image's pixels."""
        return self.chat.processor.post_process_generation(text, request.image.size)
