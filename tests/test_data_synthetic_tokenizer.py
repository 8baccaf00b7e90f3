"""Tests of ferret.data.synthetic_tokenizer: in-process BPE training with LLaMA-like behaviour."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferret.constants import IMAGE_TOKEN, REGION_TOKEN
from ferret.conversation import FERRET_V1_SYSTEM
from ferret.data.synthetic_tokenizer import BYTE_TOKENS, add_ferret_tokens, train_bpe_tokenizer


def test_special_token_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.pad_token == "<unk>" and tok.padding_side == "right"
    assert tok.convert_ids_to_tokens(list(range(3, 259))) == list(BYTE_TOKENS)
    region_id, image_id = tok.convert_tokens_to_ids([REGION_TOKEN, IMAGE_TOKEN])
    assert (region_id, image_id) == (len(tok) - 2, len(tok) - 1)
    assert len(tok) <= 600


def test_bos_prepended_no_eos(tiny_tokenizer):
    ids = tiny_tokenizer("The dog").input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id and tiny_tokenizer.eos_token_id not in ids


def test_digits_split_and_region_token_whole(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("at [102, 33, 640, 720] <region_fea>")
    digits = [t.lstrip("▁") for t in tokens if t.lstrip("▁").isdigit()]
    assert digits == list("1023364072" "0")
    assert tokens[-1] == REGION_TOKEN and tokens.count(REGION_TOKEN) == 1
    assert tiny_tokenizer.tokenize("<image>\nHi").count(IMAGE_TOKEN) == 1
    assert tiny_tokenizer.tokenize("a</s>b").count("</s>") == 1


def test_template_text_is_compact(tiny_tokenizer):
    # the system text is in every prompt: it must not fall apart into characters
    n = len(tiny_tokenizer(FERRET_V1_SYSTEM).input_ids)
    assert n < len(FERRET_V1_SYSTEM) / 2.5


@pytest.mark.parametrize(
    "text",
    [
        "The dog [102, 33, 640, 720] is on the grass.",
        "  leading and trailing spaces  ",
        "tabs\tand\nnew lines\n\n",
        "unseen: héllo ✓ 日本 🦊",
        "What is at [500, 400] <region_fea>? ASSISTANT: ok</s>USER: more",
    ],
)
def test_decode_encode_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer(text).input_ids
    assert tiny_tokenizer.unk_token_id not in ids  # byte fallback, never <unk>
    assert tiny_tokenizer.decode(ids[1:]) == text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_property(tiny_tokenizer, text):
    text = text.replace("\x00", "")
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    for special in ("<s>", "</s>", "<unk>", REGION_TOKEN, IMAGE_TOKEN):
        if special in text:
            return
    assert tiny_tokenizer.decode(ids) == text


def test_deterministic_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    corpus = ["a red circle [1, 2, 3, 4]", "a blue square next to it"] * 5
    a = train_bpe_tokenizer(corpus, vocab_size=400, save_dir=tmp_path / "tok")
    b = train_bpe_tokenizer(corpus, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    sample = "USER: <image>\na red circle [1, 2] <region_fea>? ASSISTANT: yes</s>"
    assert loaded(sample).input_ids == a(sample).input_ids
    assert loaded.pad_token_id == a.pad_token_id and loaded.bos_token == "<s>"
    assert loaded.decode(loaded(sample).input_ids[1:]) == sample


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 300"):
        train_bpe_tokenizer(["x"], vocab_size=100)
    with pytest.raises(ValueError, match="not one string"):
        train_bpe_tokenizer("a whole string", vocab_size=400)
    with pytest.raises(ValueError, match="training text 1 is int"):
        train_bpe_tokenizer(["ok", 3], vocab_size=400)


def test_add_ferret_tokens_is_idempotent(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    assert add_ferret_tokens(tok) == 0


def test_add_ferret_tokens_to_a_stock_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tok.convert_tokens_to_ids(REGION_TOKEN) == tok.unk_token_id
    assert add_ferret_tokens(tok) == 2
    assert tok.tokenize(f"a {REGION_TOKEN} b") == ["a", REGION_TOKEN, "b"]
    assert tok.convert_tokens_to_ids(REGION_TOKEN) == 5
    assert add_ferret_tokens(tok) == 0
