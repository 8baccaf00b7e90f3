"""Train the synthetic world's BPE tokenizer (`ferret.data.synthetic_tokenizer`) on its corpus.

    python -m ferret.data.build_tokenizer --data data/synth --out ferret/assets/tokenizer --vocab-size 600 [--number-tokens]

The corpus is every training conversation written in the ferret_v1 template, with its
placeholders replaced by grid boxes (human turns with ` <region_fea>`), plus the template
texts `train_bpe_tokenizer` always adds. After saving, the folder is reloaded with
`AutoTokenizer` (offline) and checked: `<region_fea>` and `<image>` are one id each and
decoding reproduces the text. Prints the mean token length of a sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from ferret.constants import IGNORE_INDEX, REGION_TOKEN
from ferret.conversation import ferret_v1, tokenize_conversation
from ferret.data.grit import PLACEHOLDER_RE, ROLES, load_grit_file
from ferret.regions import Box, clip_box, format_region


def sample_messages(sample: dict) -> list[tuple[str, str]]:
    """The sample's turns with every placeholder written as its box (cheap: no masks decoded)."""
    width, height = sample.get("image_w"), sample.get("image_h")
    boxes = sample.get("box_x1y1x2y2")
    messages = []
    for t, turn in enumerate(sample["conversations"]):
        text = turn["value"]
        if boxes is not None:
            turn_boxes = [clip_box(Box(*b), width, height) for b in boxes[t]]
            text = PLACEHOLDER_RE.sub(
                lambda m: format_region(turn_boxes[int(m.group(1))], width, height, with_token=t % 2 == 0), text)
        messages.append((ROLES[turn["from"]], text))
    return messages


def corpus_texts(samples: list[dict]) -> list[str]:
    texts = []
    for sample in samples:
        conv = ferret_v1()
        for role, text in sample_messages(sample):
            conv.append_message(role, text)
        texts.append(conv.get_prompt())
    return texts


def token_stats(tokenizer, samples: list[dict]) -> dict:
    """Mean/max tokens per sample (whole prompt) and per supervised answer."""
    totals, answers = [], []
    for sample in samples:
        ids, labels = tokenize_conversation(sample_messages(sample), tokenizer)
        totals.append(len(ids))
        answers.append(int((labels != IGNORE_INDEX).sum()))
    return {
        "samples": len(samples),
        "mean_tokens": round(statistics.fmean(totals), 2),
        "max_tokens": max(totals),
        "mean_answer_tokens": round(statistics.fmean(answers), 2),
    }


def check_saved(out: str, probe: str) -> None:
    """Reload the folder offline and check the Ferret tokens and round trip."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for token in (REGION_TOKEN, "<image>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"{token} encodes to {len(ids)} ids in the saved tokenizer")
    if tokenizer.decode(tokenizer(probe, add_special_tokens=False)["input_ids"]) != probe:
        raise RuntimeError("the saved tokenizer does not round-trip its training text")


def build(data_dir: str, out: str, vocab_size: int, max_samples: int | None = None,
          number_tokens: bool = False) -> dict:
    from ferret.data.synthetic_tokenizer import train_bpe_tokenizer

    train_path = os.path.join(data_dir, "train.json")
    samples = load_grit_file(train_path, check_images=False)
    if max_samples is not None:
        samples = samples[:max_samples]
    if not samples:
        raise ValueError(f"{train_path} holds no usable samples")
    texts = corpus_texts(samples)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, save_dir=out, number_tokens=number_tokens)
    check_saved(out, texts[0])
    stats = token_stats(tokenizer, samples[:2000])
    stats.update(vocab_size=len(tokenizer), region_token_id=tokenizer.convert_tokens_to_ids(REGION_TOKEN),
                 folder_bytes=sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)))
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the small tokenizer on a synthetic GRIT corpus.")
    parser.add_argument("--data", required=True, help="folder with train.json (ferret.data.synthetic output)")
    parser.add_argument("--out", required=True, help="folder to save the tokenizer in")
    parser.add_argument("--vocab-size", type=int, default=600)
    parser.add_argument("--max-samples", type=int, default=None, help="train on the first N samples only")
    parser.add_argument("--number-tokens", action="store_true",
                        help="one token per integer 0-999 (coordinates) instead of one per digit")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.data, args.out, args.vocab_size, args.max_samples, args.number_tokens), indent=2))


if __name__ == "__main__":
    main()
