"""The synthetic world's tokenizer: a small LLaMA-like BPE trained in-process (the embedded
model's, `ferret.data.build_tokenizer`, and the tiny test models'). Released Ferret models use
Vicuna's tokenizer instead, loaded by `ferret.model.builder.load_tokenizer`.

Behaviour, chosen to match what Ferret's code expects of the Vicuna tokenizer:

* ids 0, 1, 2 are ``<unk>``, ``<s>`` (BOS, prepended to every encoding) and ``</s>`` (EOS);
  padding uses ``<unk>`` as LLaVA/Ferret do with Vicuna.
* ids 3..258 are the byte tokens ``<0x00>``..``<0xFF>``: characters never seen in training fall
  back to their UTF-8 bytes, so nothing becomes ``<unk>``.
* spaces become ``▁`` and start a word (metaspace); no dummy space is prepended, so
  ``decode(encode(x)) == x`` for every string.
* digits are split one by one, as LLaMA does, so grid coordinates cost one token per digit;
  or, with ``number_tokens=True``, every integer 0-999 is one token (Ferret's 0-999 grid: one
  token per coordinate, whose embedding can carry the value; see ``number_token_ids``). The text
  is the same either way ("[345, 120, 560, 780]"), and ``digit_twin`` turns a number-token
  tokenizer into the digit one the same texts would have built (to measure one against the other).
* ``<region_fea>`` and ``<image>`` are special tokens with one id each, appended after the
  learned vocabulary (``<region_fea>`` first, like the released checkpoint's id 32000).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ferret.constants import IMAGE_TOKEN, REGION_TOKEN
from ferret.conversation import FERRET_V1_SYSTEM

__all__ = ["SPECIAL_TOKENS", "TEMPLATE_TEXTS", "train_bpe_tokenizer", "add_ferret_tokens", "number_token_ids",
           "digit_token_ids", "digit_twin"]

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
_METASPACE = "▁"

# Always part of the training texts, so that prompts tokenise compactly.
TEMPLATE_TEXTS = (
    FERRET_V1_SYSTEM + " USER: " + IMAGE_TOKEN + "\nWhat is in [120, 300, 560, 880] "
    + REGION_TOKEN + "? ASSISTANT: It is an object [0, 1, 2, 3].</s>USER: And at [4, 5] "
    + REGION_TOKEN + "? ASSISTANT: Something [6, 7, 8, 9].</s>",
    "USER: ASSISTANT: [x, y] [x1, y1, x2, y2] 0 1 2 3 4 5 6 7 8 9",
)


def _base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="never", split=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_METASPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    return tok


def _with_byte_tokens(trained: Tokenizer) -> Tokenizer:
    """Rebuild the trained BPE with the 256 byte tokens right after the special tokens."""
    spec = json.loads(trained.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token, _ in learned:
        if token not in vocab:
            vocab[token] = len(vocab)
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


NUMBER_RANGE = 1000  # Ferret's coordinate grid: 0..999


def _with_number_tokens(tok: Tokenizer) -> Tokenizer:
    """Make every integer 0..999 one token: digit runs stay whole in pre-tokenisation, the 990
    multi-digit numbers join the vocabulary, and BPE merges (placed before the learned ones)
    build them. A three-digit number has both merge paths ("34"+"5" and "3"+"45"), so whichever
    pair merges first, the number ends whole; longer runs split into numbers ("1000" -> "100", "0")."""
    spec = json.loads(tok.to_str())
    for pre in spec["pre_tokenizer"]["pretokenizers"]:
        if pre["type"] == "Digits":
            pre["individual_digits"] = False
    vocab = spec["model"]["vocab"]
    merges = []
    for n in range(10, NUMBER_RANGE):
        text = str(n)
        if text not in vocab:
            vocab[text] = len(vocab)
        if n < 100:
            merges.append([text[0], text[1]])
        else:
            merges.append([text[:2], text[2]])
            if text[1] != "0":  # "1"+"05" never arises: "05" is no token
                merges.append([text[0], text[1:]])
    spec["model"]["merges"] = merges + [m for m in spec["model"]["merges"] if m not in merges]
    return Tokenizer.from_str(json.dumps(spec))


def number_token_ids(tokenizer) -> list[int] | None:
    """Ids of the tokens "0".."999" (index = value) when the tokenizer writes each as one token
    (``train_bpe_tokenizer(number_tokens=True)``), else None."""
    ids = []
    for value in range(NUMBER_RANGE):
        found = tokenizer.encode(str(value), add_special_tokens=False)
        if len(found) != 1:
            return None
        ids.append(found[0])
    return ids


def digit_token_ids(tokenizer) -> list[int] | None:
    """Ids of the tokens "0".."9" (index = digit) when each is one token, else None."""
    ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
    return [found[0] for found in ids] if all(len(found) == 1 for found in ids) else None


def _is_number(token: str) -> bool:
    return token.isascii() and token.isdigit()


def digit_twin(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tokenizer ``train_bpe_tokenizer(number_tokens=False)`` builds on the same texts, made
    from one built with ``number_tokens=True``: the multi-digit number tokens and their merges go,
    digits split one by one again, and ``<region_fea>`` / ``<image>`` follow the learned vocabulary.
    The learned BPE is the same either way (it is trained on digits split one by one), so the two
    tokenizers differ only in how numbers are written."""
    if number_token_ids(tokenizer) is None:
        raise ValueError("digit_twin needs a tokenizer with one token per number 0-999 (number_tokens=True)")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for pre in spec["pre_tokenizer"]["pretokenizers"]:
        if pre["type"] == "Digits":
            pre["individual_digits"] = True
    kept = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
            if not (_is_number(t) and len(t) > 1)]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(kept)}
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if not all(_is_number(part) for part in m)]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    spec["post_processor"] = None
    return _as_ferret_tokenizer(Tokenizer.from_str(json.dumps(spec)))


def _as_ferret_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Append the Ferret tokens, prepend BOS to every encoding and wrap for transformers."""
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (REGION_TOKEN, IMAGE_TOKEN)]
    )
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,
        additional_special_tokens=[REGION_TOKEN, IMAGE_TOKEN],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def add_ferret_tokens(tokenizer) -> int:
    """Add ``<region_fea>`` (and ``<image>``) as special tokens to a transformers tokenizer.

    Returns how many tokens were new (resize the model's embeddings by that much)."""
    new = [t for t in (REGION_TOKEN, IMAGE_TOKEN) if t not in tokenizer.get_vocab()]
    if not new:
        return 0
    return tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2000,
    save_dir: str | os.PathLike | None = None,
    number_tokens: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a LLaMA-like BPE tokenizer (see the module docstring) on ``texts`` plus the
    ferret_v1 template texts. Deterministic for the same texts. ``vocab_size`` counts everything
    (3 special + 256 byte + learned + 2 ferret tokens) and must be at least 300. With
    ``save_dir`` the tokenizer is also saved there as a folder ``AutoTokenizer`` loads offline.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not one string")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (259 fixed tokens), got {vocab_size}")
    corpus = list(TEMPLATE_TEXTS)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"training text {i} is {type(t).__name__}, not str")
        corpus.append(t)
    # The ferret tokens are added whole afterwards; keep them out of the merges.
    corpus = [t.replace(REGION_TOKEN, " ").replace(IMAGE_TOKEN, " ") for t in corpus]

    base = _base_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS) - 2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    base.train_from_iterator(corpus, trainer=trainer)
    tok = _with_byte_tokens(base)
    if number_tokens:
        tok = _with_number_tokens(tok)
    fast = _as_ferret_tokenizer(tok)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(save_dir))
    return fast
