"""Tests of ferret.conversation: the ferret_v1 template, prompt tokenisation, label masking."""

from __future__ import annotations

import json

import pytest
import torch

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN
from ferret.conversation import (
    FERRET_V1_SYSTEM,
    Conversation,
    count_region_tokens,
    ferret_v1,
    get_conversation_template,
    tokenize_conversation,
    tokenize_prompt,
)

DOG = [
    ("USER", "<image>\nWhere is the dog?"),
    ("ASSISTANT", "The dog [102, 33, 640, 720] is on the grass."),
    ("USER", "What is at [500, 400] <region_fea>?"),
    ("ASSISTANT", "5 cats [1, 2, 3, 4]."),
]


def _supervised_runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    runs, cur = [], []
    for t, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_golden_prompts(shared_fixtures):
    golden = json.loads((shared_fixtures / "prompt_golden.json").read_text())
    assert golden["template"] == "ferret_v1"
    assert len(golden["cases"]) == 3
    for case in golden["cases"]:
        conv = ferret_v1()
        for role, text in case["messages"]:
            conv.append_message(role, text)
        assert conv.get_prompt() == case["prompt"]


def test_template_layout_and_copy():
    conv = ferret_v1()
    assert conv.system == FERRET_V1_SYSTEM and conv.system.endswith("instructions. ")
    conv.append_message("USER", "hi")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == FERRET_V1_SYSTEM + " USER: hi ASSISTANT:"
    other = conv.copy()
    other.messages[-1][1] = "yo"
    assert conv.messages[-1][1] is None
    assert other.get_prompt().endswith("ASSISTANT: yo</s>")
    assert ferret_v1().messages == []  # fresh each time
    assert get_conversation_template("ferret_v1").get_prompt() == FERRET_V1_SYSTEM + " "
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_conversation_template("llama_2")
    with pytest.raises(ValueError, match="unknown role"):
        conv.append_message("SYSTEM", "x")


def test_reply_spans_cover_reply_and_eos():
    conv = Conversation(system="S. ")
    for role, text in DOG:
        conv.append_message(role, text)
    prompt, spans = conv.get_prompt_and_reply_spans()
    assert [prompt[a:b] for a, b in spans] == [DOG[1][1] + "</s>", DOG[3][1] + "</s>"]


def test_count_region_tokens():
    assert count_region_tokens("a [1, 2] <region_fea> b [1, 2, 3, 4] <region_fea>") == 2
    assert count_region_tokens("nothing") == 0


def test_tokenize_prompt_places_image_and_region_ids(tiny_tokenizer):
    prompt = "Hi USER: <image>\nWhat is at [500, 400] <region_fea>? ASSISTANT:"
    ids = tokenize_prompt(prompt, tiny_tokenizer)
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids.count(region_id) == 1
    # everything except the placeholder decodes back to the prompt text
    text = tiny_tokenizer.decode([t for t in ids[1:] if t != IMAGE_TOKEN_INDEX])
    assert text == prompt.replace("<image>", "")


def test_tokenize_prompt_without_image_token_in_vocab(tiny_tokenizer):
    """A stock tokenizer without <image>: text around the placeholder is encoded in pieces."""
    import copy

    from ferret.conversation import encode_prompt_with_offsets

    tok = copy.deepcopy(tiny_tokenizer)

    class NoImageToken:
        """Delegates to the tokenizer but reports <image> as unknown."""

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            return tok(*a, **k)

        def convert_tokens_to_ids(self, token):
            return tok.unk_token_id if token == "<image>" else tok.convert_tokens_to_ids(token)

    prompt = "A USER: <image>\nWhat? ASSISTANT:"
    ids, offsets = encode_prompt_with_offsets(prompt, NoImageToken())
    assert ids[0] == tok.bos_token_id and ids.count(IMAGE_TOKEN_INDEX) == 1
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert prompt[offsets[at][0] : offsets[at][1]] == "<image>"
    assert tok.decode(ids[1:at]) + "<image>" + tok.decode(ids[at + 1 :]) == prompt


def test_tokenize_prompt_requires_region_token():
    from ferret.data.synthetic_tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["plain text"], vocab_size=300)

    class Stock:
        is_fast = True
        unk_token_id = tok.unk_token_id

        def convert_tokens_to_ids(self, token):
            return tok.unk_token_id

    with pytest.raises(ValueError, match="no <region_fea> token"):
        tokenize_prompt("what is [1, 2] <region_fea>?", Stock())


def test_labels_supervise_exactly_the_replies(tiny_tokenizer):
    ids, labels = tokenize_conversation(DOG, tiny_tokenizer)
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape and ids.dim() == 1
    conv = ferret_v1()
    for role, text in DOG:
        conv.append_message(role, text)
    assert ids.tolist() == tokenize_prompt(conv.get_prompt(), tiny_tokenizer)
    runs = _supervised_runs(ids, labels)
    # each supervised run is " " + reply + "</s>": the separator space after "ASSISTANT:" is
    # part of what the model must produce
    assert [tiny_tokenizer.decode(r) for r in runs] == [" " + DOG[1][1] + "</s>", " " + DOG[3][1] + "</s>"]
    assert all(r[-1] == tiny_tokenizer.eos_token_id for r in runs)
    assert labels[0] == IGNORE_INDEX and (labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()


def test_generation_prompt_has_no_labels(tiny_tokenizer):
    ids, labels = tokenize_conversation(DOG[:3] + [("ASSISTANT", None)], tiny_tokenizer)
    runs = _supervised_runs(ids, labels)
    assert len(runs) == 1  # only the finished first reply
    assert tiny_tokenizer.decode(ids[-3:]).endswith("ASSISTANT:")


def test_accepts_dicts_and_conversation_objects(tiny_tokenizer):
    as_dicts = [{"from": r, "value": t} for r, t in DOG]
    conv = ferret_v1()
    for role, text in DOG:
        conv.append_message(role, text)
    a = tokenize_conversation(as_dicts, tiny_tokenizer)
    b = tokenize_conversation(conv, tiny_tokenizer)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "no messages"),
        ([("ASSISTANT", "hi")], "alternate"),
        ([("USER", "a"), ("USER", "b")], "alternate"),
        ([("USER", None), ("ASSISTANT", "x")], "only the final assistant"),
        ([("USER", "a", "b")], r"\(role, text\)"),
    ],
)
def test_bad_conversations(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(messages, tiny_tokenizer)


def test_truncation_keeps_image_and_whole_region_references(tiny_tokenizer):
    full_ids, full_labels = tokenize_conversation(DOG, tiny_tokenizer)
    region_id = tiny_tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    region_at = full_ids.tolist().index(region_id)
    # cut inside "[500, 400] <region_fea>": the whole reference goes
    for max_length in range(region_at - 6, region_at + 1):
        ids, labels = tokenize_conversation(DOG, tiny_tokenizer, max_length=max_length)
        assert len(ids) <= max_length and len(ids) == len(labels)
        assert region_id not in ids.tolist()
        assert IMAGE_TOKEN_INDEX in ids.tolist()
        text = tiny_tokenizer.decode([t for t in ids.tolist() if t != IMAGE_TOKEN_INDEX])
        assert not text.rstrip().endswith(("[", ",", "0"))  # no dangling coordinates
    ids, labels = tokenize_conversation(DOG, tiny_tokenizer, max_length=region_at + 1)
    assert ids[-1] == region_id and len(ids) == region_at + 1
    assert torch.equal(labels, full_labels[: region_at + 1])
    ids, _ = tokenize_conversation(DOG, tiny_tokenizer, max_length=len(full_ids) + 10)
    assert torch.equal(ids, full_ids)
    with pytest.raises(ValueError, match="would cut off the <image>"):
        tokenize_conversation(DOG, tiny_tokenizer, max_length=5)
    with pytest.raises(ValueError, match="max_length must be positive"):
        tokenize_conversation(DOG, tiny_tokenizer, max_length=0)
