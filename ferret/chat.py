"""One-call inference: `FerretChat.from_pretrained(path).ask(image, question, regions)`.

A question may refer to regions (Point / Box / FreeForm in image pixels): they are written into
the text as `[x1, y1, x2, y2] <region_fea>` (at `<region>` placeholders, else appended) and
each becomes a (W, H) mask for the region sampler. The answer comes back as text plus the boxes
it names, parsed back to image pixels. `history` continues a conversation about the same image;
regions of earlier turns stay referenced. `ask_batch` answers several requests in one padded
generate call; `stream` yields the answer text as it is produced. A request is encoded by
FerretProcessor and padded by FerretCollator, exactly as a training sample is.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ferret.constants import IMAGE_TOKEN, REGION_TOKEN
from ferret.data.collate import FerretCollator
from ferret.processing import REGION_PLACEHOLDER, FerretProcessor, build_question, load_image
from ferret.regions import Box, FreeForm, GroundedRegion, Point, Region

ImageInput = str | Image.Image


@dataclass(frozen=True)
class ChatHistory:
    """Earlier turns about one image: user texts (with region coordinates), replies, region masks.

    ``region_masks`` may also hold the regions themselves (Point / Box / FreeForm): their masks
    are then built only once the request is known to fit the model's context.
    """

    turns: tuple[tuple[str, str], ...] = ()
    region_masks: tuple[torch.Tensor | Region, ...] = ()
    image_size: tuple[int, int] | None = None  # (width, height); None for a text-only chat


@dataclass(frozen=True)
class Answer:
    text: str
    regions: list[GroundedRegion]
    history: ChatHistory = field(repr=False)


@dataclass
class _Request:
    sample: dict  # FerretProcessor.encode: input_ids, pixel_values, region_masks, image_size
    user_text: str
    history: ChatHistory


class FerretChat:
    def __init__(self, tokenizer, model, image_processor, context_len: int = 2048, seed: int = 0):
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        # The training dataset's encoder and collator: a request is encoded as a training sample is.
        self.processor = FerretProcessor(tokenizer, image_processor)
        self.collator = FerretCollator(tokenizer.pad_token_id)
        self.context_len = context_len
        self.seed = seed  # seeds the region sampler's point draws: same request, same answer

    @classmethod
    def from_pretrained(
        cls,
        model_path=None,
        load_4bit: bool = False,
        load_8bit: bool = False,
        device: str = "auto",
        dtype: torch.dtype | None = None,
    ) -> "FerretChat":
        from ferret.model.builder import load_pretrained

        tokenizer, model, processor, context_len = load_pretrained(
            model_path, load_8bit=load_8bit, load_4bit=load_4bit, device=device, dtype=dtype
        )
        return cls(tokenizer, model, processor, context_len)

    # ----------------------------------------------------------------- public API

    def ask(
        self,
        image: ImageInput | None,
        question: str,
        regions: Sequence[Region] | Region = (),
        history: ChatHistory | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
    ) -> Answer:
        _check_sampling(temperature, top_p, max_new_tokens)
        request = self._prepare(image, question, regions, history, max_new_tokens)
        return self._answer([request], temperature, top_p, max_new_tokens)[0]

    def ask_batch(
        self,
        requests: Sequence[tuple],
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
    ) -> list[Answer]:
        """Answer (image, question[, regions[, history]]) requests in one padded generate call."""
        _check_sampling(temperature, top_p, max_new_tokens)
        if not requests:
            return []
        prepared = []
        for index, request in enumerate(requests):
            if not isinstance(request, (tuple, list)) or not 2 <= len(request) <= 4:
                raise ValueError(f"request {index} must be (image, question[, regions[, history]])")
            prepared.append(self._prepare(*request, max_new_tokens=max_new_tokens))
        return self._answer(prepared, temperature, top_p, max_new_tokens)

    def stream(
        self,
        image: ImageInput | None,
        question: str,
        regions: Sequence[Region] | Region = (),
        history: ChatHistory | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield pieces of the answer text as they are generated (joined, they equal `ask(...).text`).

        Generation stops within one decoding step once ``cancel`` is set, or once the caller stops
        iterating (closing this generator joins the generation thread).
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        _check_sampling(temperature, top_p, max_new_tokens)
        stop = threading.Event()

        def stopped() -> bool:
            return stop.is_set() or (cancel is not None and cancel.is_set())

        if stopped():
            return
        request = self._prepare(image, question, regions, history, max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = self._batch_inputs([request])
        del request  # the masks now live only in `inputs`, released when generation ends
        failure: list[BaseException] = []

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stopped(), dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            try:
                self.model.generate(
                    **inputs, **self._sampling(temperature, top_p, max_new_tokens), streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                )
            except BaseException as error:  # surface it in the caller's thread
                failure.append(error)
                streamer.end()
            finally:
                inputs.clear()

        worker = threading.Thread(target=run, daemon=True, name="ferret-generate")
        worker.start()
        try:
            for piece in streamer:
                if stopped():
                    break
                yield piece
        finally:
            stop.set()  # a caller that stops early stops the generation (at its next step)
            worker.join()
        if failure and not (cancel is not None and cancel.is_set()):
            raise failure[0]

    # ----------------------------------------------------------------- internals

    def _prepare(self, image, question, regions=(), history=None, max_new_tokens: int = 128) -> _Request:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty string")
        if REGION_TOKEN in question or IMAGE_TOKEN in question:
            raise ValueError(f"write regions with the `regions` argument, not literal {REGION_TOKEN}/{IMAGE_TOKEN}")
        history = history if history is not None else ChatHistory()
        regions = [regions] if isinstance(regions, (Point, Box, FreeForm)) else list(regions or ())
        picture = load_image(image) if image is not None else None
        size = picture.size if picture is not None else None
        if history.turns and history.image_size != size:
            raise ValueError(
                f"this history is about an image of size {history.image_size}, but the new image is {size}; "
                "start a new conversation for a different image"
            )
        if size is None and (regions or REGION_PLACEHOLDER in question):
            raise ValueError("regions need an image")
        user_text = build_question(question.strip(), regions, *size) if size is not None else question.strip()
        messages = [message for asked, replied in history.turns for message in (("USER", asked), ("ASSISTANT", replied))]
        messages += [("USER", user_text), ("ASSISTANT", None)]
        image_positions = self._num_patches() - 1 if size else 0  # <image> becomes the patch embeddings

        def check_length(n_tokens: int) -> None:
            length = n_tokens + max_new_tokens + image_positions
            if length > self.context_len:
                raise ValueError(
                    f"the conversation needs {length} positions (prompt + image + {max_new_tokens} new tokens) "
                    f"but the model's context is {self.context_len}; shorten it or start a new one"
                )

        sample = self.processor.encode(picture, messages, [*history.region_masks, *regions],
                                       return_labels=False, check_length=check_length)
        return _Request(sample, user_text, history)

    def _num_patches(self) -> int:
        tower = self.model.get_vision_tower()
        return tower.num_patches if tower is not None else 0

    def _batch_inputs(self, requests: list[_Request]) -> dict:
        batch = self.collator([r.sample for r in requests])
        device = self.model.device
        masks = batch["region_masks"]
        generators = [torch.Generator().manual_seed(self.seed) for _ in requests]
        return dict(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            images=batch["pixel_values"].to(device) if "pixel_values" in batch else None,
            region_masks=masks if any(masks) else None,
            region_generator=generators,
        )

    def _sampling(self, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        _check_sampling(temperature, top_p, max_new_tokens)
        options = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        if temperature == 0:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        return options

    def _answer(self, requests: list[_Request], temperature, top_p, max_new_tokens) -> list[Answer]:
        options = self._sampling(temperature, top_p, max_new_tokens)
        output = self.model.generate(**self._batch_inputs(requests), **options)
        answers = []
        for request, tokens in zip(requests, output):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            size = request.sample["image_size"]
            regions = self.processor.post_process_generation(text, size) if size else []
            history = ChatHistory(
                turns=request.history.turns + ((request.user_text, text),),
                region_masks=tuple(request.sample["region_masks"]),
                image_size=size,
            )
            answers.append(Answer(text=text, regions=regions, history=history))
        return answers


def _check_sampling(temperature, top_p, max_new_tokens) -> None:
    """ValueError unless temperature is a finite number >= 0, top_p a number in (0, 1] and
    max_new_tokens an integer >= 1 (checked before any work)."""

    def show(value) -> str:
        try:
            text = repr(value)
        except ValueError:  # an int too long to print
            return f"an {type(value).__name__} too large to print"
        return text if len(text) <= 40 else text[:37] + "..."

    def real(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False

    if not real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {show(temperature)}")
    if not real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {show(top_p)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 2**31:
        raise ValueError(f"max_new_tokens must be an integer in [1, 2**31], got {show(max_new_tokens)}")
