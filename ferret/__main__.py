"""`ferret` command line.

    ferret ask --image IMG [--box x1,y1,x2,y2 | --point x,y | --mask MASK.png] [--model-path PATH]
               [--load-4bit | --load-8bit] [--max-new-tokens N] "question"
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

EXIT_USAGE = 2
EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples"


class UsageError(ValueError):
    """A command-line argument is malformed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument parsing


def _numbers(text: str, count: int, what: str) -> list[float]:
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    if len(parts) != count:
        raise UsageError(f"--{what} needs {count} comma-separated numbers, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--{what} needs numbers, got {text!r}") from None


def regions_from_args(args) -> list:
    from ferret.regions import Box, FreeForm, Point

    if args.box:
        return [Box(*_numbers(args.box, 4, "box"))]
    if args.point:
        return [Point(*_numbers(args.point, 2, "point"))]
    if args.mask:
        import numpy as np

        from ferret.processing import load_image

        picture = load_image(args.mask).convert("L")
        return [FreeForm(np.asarray(picture) > 0)]
    return []


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ferret", description="Ferret: refer and ground anything anywhere.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ask = commands.add_parser("ask", help="answer one question about an image")
    ask.add_argument("question", help="the question; '<region>' marks where the region goes")
    ask.add_argument("--image", required=True, help="image file")
    where = ask.add_mutually_exclusive_group()
    where.add_argument("--box", help="box x1,y1,x2,y2 in image pixels")
    where.add_argument("--point", help="point x,y in image pixels")
    where.add_argument("--mask", help="free-form region: an image file, non-zero pixels = region")
    ask.add_argument("--model-path", default=None, help="Ferret checkpoint folder (default: $FERRET_MODEL_PATH)")
    bits = ask.add_mutually_exclusive_group()
    bits.add_argument("--load-4bit", action="store_true", help="quantize the LLM to 4-bit nf4")
    bits.add_argument("--load-8bit", action="store_true", help="quantize the LLM to 8-bit")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ask.set_defaults(run=run_ask)

    # `demo` (the gradio stack) is handed to ferret.serve.demo in main(); listed here for --help.
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
    if not answer.regions:
        print("Grounded regions: none", file=out)
        return
    print("Grounded regions (image pixels):", file=out)
    for region in answer.regions:
        coords = region.box if region.box is not None else region.point
        text = ", ".join(f"{v:.1f}" for v in coords)
        print(f"  {region.phrase or '(no phrase)'}: [{text}]", file=out)


def run_ask(args) -> int:
    from ferret.chat import FerretChat
    from ferret.processing import load_image
    from ferret.regions import region_mask

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Check the cheap inputs before spending time on loading the model.
    image = load_image(args.image)
    regions = regions_from_args(args)
    for region in regions:
        region_mask(region, *image.size)
    chat = FerretChat.from_pretrained(
        args.model_path, load_4bit=args.load_4bit, load_8bit=args.load_8bit, device=args.device
    )
    answer = chat.ask(image, args.question, regions=regions, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens)
    print_answer(answer)
    return 0


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
    questions = [("What is the object <region>?", [region], f"box {target['box']} (the {target['label']})"),
                 (f"What is the location of the {other['label']} in the image?", [], f"true box {other['box']}")]
    for question, regions, note in questions:
        print(f"Question: {question}   ({note})")
        answer = chat.ask(str(image_path), question, regions=regions, max_new_tokens=args.max_new_tokens)
        print(f"Prompt text sent: {answer.history.turns[0][0]}")
        print_answer(answer)
    suffix = "" if model_path is not None else " (random model; answers meaningless)"
    print(f"done in {time.perf_counter() - started:.1f} s{suffix}")
    return 0


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
    if argv[:1] == ["demo"]:
        from ferret.serve.demo import main as serve_demo

        return serve_demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"ferret: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
