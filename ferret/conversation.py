"""The ``ferret_v1`` conversation template and conversation tokenisation with label masking.

Prompt layout (the released ``ferret_v1`` template, two-separator style)::

    SYSTEM + " " + "USER: " + msg + " " + "ASSISTANT: " + reply + "</s>" + "USER: " ... "ASSISTANT:"

The system text ends with a space, so two spaces precede the first ``USER:``. A turn whose text
is None (or empty) is the one to generate: it is written as ``"ASSISTANT:"``.
"""

from __future__ import annotations

import copy as _copy
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from ferret.constants import GRID_SIZE, IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, REGION_TOKEN

__all__ = [
    "FERRET_V1_SYSTEM",
    "Conversation",
    "ferret_v1",
    "conv_templates",
    "get_conversation_template",
    "count_region_tokens",
    "tokenize_prompt",
    "tokenize_conversation",
    "encode_prompt_with_offsets",
    "as_conversation",
]

FERRET_V1_SYSTEM = (
    "A chat between a human and an AI that understands visuals. "
    "In images, [x, y] denotes points: top-left [0, 0], bottom-right [width-1, height-1]. "
    "Increasing x moves right; y moves down. "
    f"Bounding box: [x1, y1, x2, y2]. Image size: {GRID_SIZE}x{GRID_SIZE}. "
    "Follow instructions. "
)

Message = Sequence  # (role, text or None)


@dataclass
class Conversation:
    """A chat history rendered with the two-separator template (user turns end with ``sep``,
    assistant turns with ``sep2``)."""

    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    messages: list[list] = field(default_factory=list)
    sep: str = " "
    sep2: str = "</s>"

    def append_message(self, role: str, text: str | None) -> None:
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; this template has roles {self.roles}")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"message text must be a string or None, got {type(text).__name__}")
        self.messages.append([role, text])

    def get_prompt_and_reply_spans(self) -> tuple[str, list[tuple[int, int]]]:
        """The prompt, and the (start, end) character span of each written assistant reply
        including its closing ``sep2`` (the part a model is trained to produce)."""
        parts = [self.system + self.sep]
        length = len(parts[0])
        spans = []
        for role, text in self.messages:
            if text:
                head = role + ": "
                tail = self.sep2 if role == self.roles[1] else self.sep
                if role == self.roles[1]:
                    start = length + len(head)
                    spans.append((start, start + len(text) + len(tail)))
                piece = head + text + tail
            else:
                piece = role + ":"
            parts.append(piece)
            length += len(piece)
        return "".join(parts), spans

    def get_prompt(self) -> str:
        return self.get_prompt_and_reply_spans()[0]

    def copy(self) -> "Conversation":
        return _copy.deepcopy(self)


def ferret_v1() -> Conversation:
    """A fresh, empty ``ferret_v1`` conversation."""
    return Conversation(system=FERRET_V1_SYSTEM)


conv_templates = {"ferret_v1": ferret_v1, "v1": ferret_v1}


def get_conversation_template(name: str = "ferret_v1") -> Conversation:
    if name not in conv_templates:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(conv_templates)}")
    return conv_templates[name]()


def count_region_tokens(text: str) -> int:
    """How many ``<region_fea>`` tokens a text holds."""
    return text.count(REGION_TOKEN)


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` when the tokenizer has it as one token, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        return None
    return int(tid)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed "
            "to align labels (load it with use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_prompt_with_offsets(prompt: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a prompt (BOS first when the tokenizer adds one) with each token's character
    span. ``<image>`` becomes IMAGE_TOKEN_INDEX; ``<region_fea>`` must be a single token."""
    if REGION_TOKEN in prompt and _single_token_id(tokenizer, REGION_TOKEN) is None:
        raise ValueError(
            f"the tokenizer has no {REGION_TOKEN} token; add it as a special token "
            "(ferret.data.synthetic_tokenizer.add_ferret_tokens) before tokenising region prompts"
        )
    image_id = _single_token_id(tokenizer, IMAGE_TOKEN)
    if image_id is not None:
        ids, offsets = _encode(tokenizer, prompt, add_special_tokens=True)
        return [IMAGE_TOKEN_INDEX if t == image_id else t for t in ids], offsets
    # The tokenizer has no <image> token (a stock LLaMA one): encode the text around each
    # placeholder separately, as LLaVA's tokenizer_image_token does.
    bos_ids, _ = _encode(tokenizer, "", add_special_tokens=True)
    ids = list(bos_ids)
    offsets: list[tuple[int, int]] = [(0, 0)] * len(ids)
    pos = 0
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((pos, pos + len(IMAGE_TOKEN)))
            pos += len(IMAGE_TOKEN)
        if chunk:
            chunk_ids, chunk_offsets = _encode(tokenizer, chunk, add_special_tokens=False)
            ids.extend(chunk_ids)
            offsets.extend((s + pos, e + pos) for s, e in chunk_offsets)
        pos += len(chunk)
    return ids, offsets


def tokenize_prompt(prompt: str, tokenizer) -> list[int]:
    """Token ids of a prompt: IMAGE_TOKEN_INDEX at ``<image>``, the ``<region_fea>`` id at each
    region token, BOS first when the tokenizer adds one."""
    return encode_prompt_with_offsets(prompt, tokenizer)[0]


_REGION_REF_RE = re.compile(r"(?:\[[^\[\]]*\]\s*)?" + re.escape(REGION_TOKEN))


def as_conversation(messages: Union[Conversation, Sequence[Message]]) -> Conversation:
    if isinstance(messages, Conversation):
        conv = messages
    else:
        conv = ferret_v1()
        for item in messages:
            if isinstance(item, dict):
                role, text = item.get("role", item.get("from")), item.get("content", item.get("value"))
            else:
                if len(item) != 2:
                    raise ValueError(f"a message must be (role, text), got {item!r}")
                role, text = item
            conv.append_message(role, text)
    if not conv.messages:
        raise ValueError("the conversation has no messages")
    for i, (role, text) in enumerate(conv.messages):
        expected = conv.roles[i % 2]
        if role != expected:
            raise ValueError(f"message {i} is from {role!r}; turns must alternate starting with {conv.roles[0]!r}")
        # None marks the reply to generate; an empty reply is one a model really gave (chat history).
        to_generate = i == len(conv.messages) - 1 and role == conv.roles[1]
        if (text is None and not to_generate) or (not text and role == conv.roles[0]):
            raise ValueError(f"message {i} ({role}) is empty; only the final assistant turn may be None")
    return conv


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    if start == end:  # zero-width token (BOS, or a prepended space): inside a span or not
        return any(a <= start < b for a, b in spans)
    return any(start < b and end > a for a, b in spans)


def tokenize_conversation(
    messages: Union[Conversation, Sequence[Message]],
    tokenizer,
    max_length: int | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Token ids of a ferret_v1 conversation and its training labels (both 1-D LongTensors).

    Labels equal the ids on the assistant replies and their closing ``</s>`` (plus the space
    that separates a reply from ``ASSISTANT:``, so the model learns to emit it) and IGNORE_INDEX
    elsewhere. Alignment comes from the tokenizer's character offsets on the whole prompt, so the
    ids are exactly what ``tokenize_prompt`` gives for the same prompt.

    ``max_length`` truncates from the end. The cut never splits a region reference
    (``[..] <region_fea>``): a partly kept reference is dropped whole, so the number of
    ``<region_fea>`` ids left tells how many region masks still apply. A ``max_length`` that
    would drop the ``<image>`` placeholder raises ValueError.
    """
    conv = as_conversation(messages)
    prompt, reply_spans = conv.get_prompt_and_reply_spans()
    # Supervise the separator space in front of each reply too (see docstring).
    spans = [(a - 1 if a > 0 and prompt[a - 1] == conv.sep else a, b) for a, b in reply_spans]
    ids, offsets = encode_prompt_with_offsets(prompt, tokenizer)
    labels = [
        t if t != IMAGE_TOKEN_INDEX and _overlaps(s, e, spans) else IGNORE_INDEX
        for t, (s, e) in zip(ids, offsets)
    ]
    if max_length is not None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if len(ids) > max_length:
            cut = max_length
            for m in _REGION_REF_RE.finditer(prompt):
                inside = [i for i, (s, e) in enumerate(offsets) if s < m.end() and e > m.start()]
                if inside and inside[0] < cut <= inside[-1]:
                    cut = inside[0]
            if IMAGE_TOKEN_INDEX in ids and ids.index(IMAGE_TOKEN_INDEX) >= cut:
                raise ValueError(
                    f"max_length={max_length} would cut off the {IMAGE_TOKEN} placeholder "
                    f"(token {ids.index(IMAGE_TOKEN_INDEX)}); raise max_length"
                )
            ids, labels = ids[:cut], labels[:cut]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
