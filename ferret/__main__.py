"""`ferret` command line.

    ferret ask --image IMG [--box x1,y1,x2,y2 | --point x,y | --mask MASK.png] [--model-path PATH]
               [--load-4bit | --load-8bit] [--save-vis OUT.png] ["question"]
                     # python -m ferret.serve.cli under another name (same flags, same output)
    ferret demo      # the gradio demo stack (controller, worker, web page) on the default model
    ferret try       # the default (embedded) model on a shipped sample image; no model: a tiny RANDOM one

Bad input (missing image, malformed coordinates, missing checkpoint, ...) prints one line on
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ferret.serve.cli import EXIT_BAD_INPUT, OneLineErrorParser, format_grounding
from ferret.serve.cli import main as ask_main

EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="ferret", description="Ferret: refer and ground anything anywhere.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    # `ask` and `demo` are handed to their modules in main(); listed here for --help.
    commands.add_parser("ask", help="ask about an image from the terminal (python -m ferret.serve.cli); "
                        "see ferret ask --help", add_help=False)
    commands.add_parser("demo", help="serve the gradio demo (controller + worker + web page); see ferret demo --help",
                        add_help=False)
    quick = commands.add_parser("try", help="ask the default (embedded) model about a shipped example image, no server")
    quick.add_argument("--max-new-tokens", type=int, default=24)
    quick.set_defaults(run=run_try)
    return parser


# --------------------------------------------------------------------------- commands


def print_answer(answer, out=None) -> None:
    out = out if out is not None else sys.stdout
    print(f"Answer: {answer.text}", file=out)
    print(format_grounding(answer.regions), file=out)


def run_try(args) -> int:
    """Ask the default model (the embedded one, or $FERRET_MODEL_PATH) about a shipped example:
    name a boxed object, then ground another one. Without any trained model, a tiny RANDOM one
    runs the same pipeline (and says so)."""
    from ferret.chat import FerretChat
    from ferret.model.builder import NoDefaultModelError, resolve_model_path
    from ferret.regions import Box

    started = time.perf_counter()
    example = json.loads((EXAMPLES / "examples.json").read_text())[0]
    target, other = example["objects"][0], example["objects"][1]
    image_path = EXAMPLES / example["file"]
    try:
        model_path = resolve_model_path(None)
    except NoDefaultModelError:
        model_path = None
    if model_path is not None:
        print(f"Model: {model_path} (the default model; its MODEL_CARD.md says what it can and cannot do)")
        chat = FerretChat.from_pretrained(model_path, device="cpu")
    else:
        chat = _random_tiny_chat()
    region = Box(*target["box"])
    print(f"Image: {image_path} ({example['width']}x{example['height']})")
    questions = [("What is the object <region>?", [region], f"box {target['box']} (the {target['label']})", None),
                 (f"What is the location of the {other['label']} in the image?", [], f"true box {other['box']}",
                  other["box"])]
    for question, regions, note, true_box in questions:
        print(f"Question: {question}   ({note})")
        answer = chat.ask(str(image_path), question, regions=regions, max_new_tokens=args.max_new_tokens)
        print(f"Prompt text sent: {answer.history.turns[0][0]}")
        print_answer(answer)
        if true_box is not None:
            print(grounding_verdict(answer.regions, true_box))
    suffix = "" if model_path is not None else " (random model; answers meaningless)"
    print(f"done in {time.perf_counter() - started:.1f} s{suffix}")
    return 0


def grounding_verdict(regions, true_box) -> str:
    """One line: the IoU of the first answered box with the true box, and whether it counts as
    grounded (IoU >= 0.5, the RefCOCO criterion)."""
    from ferret.eval.metrics import box_iou

    boxes = [r.box for r in regions if r.box is not None]
    if not boxes:
        return "Grounding: no box in the answer"
    iou = box_iou(boxes[0], tuple(true_box))
    return f"Grounding: IoU {iou:.2f} with the true box ({'grounded' if iou >= 0.5 else 'missed'}: IoU >= 0.5 counts)"


def _random_tiny_chat():
    from ferret.chat import FerretChat
    from ferret.model.tiny import build_tiny_model
    from ferret.processing import build_image_processor

    print("NOTE: no trained model is available, so this demo uses a tiny, RANDOMLY INITIALISED Ferret")
    print("      built in-process (no weights are downloaded). It exercises the whole pipeline; its")
    print("      answers are meaningless noise.")
    model, tokenizer = build_tiny_model(seed=0)
    image_size = model.config.vision_tower_config().image_size
    return FerretChat(tokenizer, model, build_image_processor(image_size), context_len=model.config.max_position_embeddings)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ask"]:  # one CLI: `ferret ask` is python -m ferret.serve.cli
        return ask_main(argv[1:], prog="ferret ask", error_prefix="ferret")
    if argv[:1] == ["demo"]:
        from ferret.serve.demo import main as serve_demo

        return serve_demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"ferret: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
