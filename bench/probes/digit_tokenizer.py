"""Save the digit twin of a number-token tokenizer (issue 13, requirement 2: digits against one
token per number 0-999), and how long the world's samples get with each.

    python bench/probes/digit_tokenizer.py --src ferret/assets/model --out checkpoints/digit_tokenizer \
        --data data/synth --samples 2000

The twin (`ferret.data.synthetic_tokenizer.digit_twin`) is the tokenizer the same texts would have
built with digits split one by one: same learned BPE, numbers written digit by digit. A run then
takes it with `model.tokenizer=checkpoints/digit_tokenizer` (and `train.box_code_weight=0
train.init_number_rows=false`: both need number tokens).
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="ferret/assets/model", help="folder of a number-token tokenizer")
    parser.add_argument("--out", required=True, help="folder to save the digit tokenizer in")
    parser.add_argument("--data", default=None, help="a world folder (train.json): token counts with both")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from ferret.data.synthetic_tokenizer import digit_twin

    numbers = AutoTokenizer.from_pretrained(args.src, local_files_only=True)
    digits = digit_twin(numbers)
    digits.save_pretrained(args.out)
    report = {"src": args.src, "out": args.out, "vocab": {"numbers": len(numbers), "digits": len(digits)}}
    if args.data:
        from ferret.data.build_tokenizer import token_stats
        from ferret.data.grit import load_grit_file

        # Token counts need the text only: no need to stat 30,000 image files.
        samples = load_grit_file(os.path.join(args.data, "train.json"), check_images=False)[: args.samples]
        report["tokens"] = {"numbers": token_stats(numbers, samples), "digits": token_stats(digits, samples)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
