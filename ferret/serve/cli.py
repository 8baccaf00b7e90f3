"""Ask Ferret about an image from the terminal (also run as ``ferret ask``, same flags).

    python -m ferret.serve.cli --image IMG [--box x1,y1,x2,y2 | --point x,y | --mask MASK.png] \
        [--model-path PATH] [--load-4bit | --load-8bit] [--save-vis OUT.png] "question"

Coordinates are pixels of the image (box corners inclusive). Write ``<region>`` in the question
where the region goes, or it is appended. Without a question the CLI reads questions from stdin,
one per line, as one conversation (the region belongs to the first question; an empty line or
end of input stops). The answer streams to stdout; the regions it grounds follow on stderr in
image pixels; ``--save-vis`` writes the image with the referred region and the answer's boxes
drawn. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

__all__ = ["OneLineErrorParser", "format_grounding", "main", "parse_region_args"]

EXIT_BAD_INPUT = 2
PROG = "python -m ferret.serve.cli"
ERROR_PREFIX = "ferret-cli"


class CliError(ValueError):
    """Bad input on the command line (reported as one line, exit 2)."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one stderr line and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _numbers(text: str, n: int, flag: str) -> list[float]:
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    if len(parts) != n:
        raise CliError(f"{flag} needs {n} comma-separated numbers, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise CliError(f"{flag} needs numbers, got {text!r}") from None


def parse_region_args(args: argparse.Namespace, image) -> list:
    """The region given by --box / --point / --mask, checked against the image."""
    from ferret.processing import MAX_IMAGE_PIXELS, ImageLoadError
    from ferret.regions import Box, FreeForm, Point, RegionError, region_to_grid
    from ferret.serve.protocol import RequestError, decode_mask

    try:
        if args.box is not None:
            region = Box(*_numbers(args.box, 4, "--box"))
        elif args.point is not None:
            region = Point(*_numbers(args.point, 2, "--point"))
        elif args.mask is not None:
            path = Path(args.mask)
            if not path.is_file():
                raise CliError(f"--mask file {args.mask!r} does not exist")
            try:
                region = FreeForm(decode_mask(path.read_bytes(), image.size, MAX_IMAGE_PIXELS, what="--mask"))
            except RequestError as error:
                raise CliError(str(error)) from None
        else:
            return []
        region_to_grid(region, *image.size)  # inside the image, not degenerate once clipped
    except (RegionError, ImageLoadError) as error:
        raise CliError(str(error)) from None
    return [region]


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=prog, description="Ask Ferret about an image (refer with a box, point or mask)."
    )
    parser.add_argument("question", nargs="?", help="the question; omit it for an interactive conversation")
    parser.add_argument("--image", required=True, help="image file")
    region = parser.add_mutually_exclusive_group()
    region.add_argument("--box", help="x1,y1,x2,y2 in pixels")
    region.add_argument("--point", help="x,y in pixels")
    region.add_argument("--mask", help="PNG the size of the image; nonzero pixels are the region")
    parser.add_argument("--model-path", default=None, help="checkpoint folder (default: the embedded model)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true")
    quant.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--save-vis", default=None, help="write the image with regions and answer boxes here")
    return parser


def _fail(message: str, prefix: str = ERROR_PREFIX) -> int:
    lines = message.strip().splitlines()
    print(f"{prefix}: error: {lines[0] if lines else 'failed'}", file=sys.stderr)
    return EXIT_BAD_INPUT


def format_grounding(regions) -> str:
    """The answer's grounded regions in image pixels: a heading, then one line per region."""
    if not regions:
        return "Grounded regions: none"
    lines = ["Grounded regions (image pixels):"]
    for region in regions:
        coords = region.box if region.box is not None else region.point
        lines.append(f"  {region.phrase or '(no phrase)'}: [" + ", ".join(f"{v:.1f}" for v in coords) + "]")
    return "\n".join(lines)


def _save_vis(path: str, image, regions, answer_regions) -> None:
    from ferret.serve.drawing import draw_grounding, draw_regions

    picture = draw_regions(image, regions)
    draw_grounding(picture, answer_regions, first_colour=len(regions)).save(path)
    print(f"[saved {path}]", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = PROG, error_prefix: str = ERROR_PREFIX) -> int:
    """Run the CLI; `prog` and `error_prefix` name it in help and errors (``ferret ask``)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line usage error
        return EXIT_BAD_INPUT if exit_.code else 0
    try:
        return _run(args)
    except CliError as error:
        return _fail(str(error), error_prefix)


def _run(args: argparse.Namespace) -> int:
    if args.question is not None and not args.question.strip():
        raise CliError("the question is empty")
    if args.save_vis and not Path(args.save_vis).resolve().parent.is_dir():
        raise CliError(f"--save-vis folder {str(Path(args.save_vis).parent)!r} does not exist")
    if (args.max_new_tokens < 1 or not math.isfinite(args.temperature) or args.temperature < 0
            or not math.isfinite(args.top_p) or not 0 < args.top_p <= 1):
        raise CliError("need --max-new-tokens >= 1, a finite --temperature >= 0 and 0 < --top-p <= 1")

    from ferret.processing import ImageLoadError, load_image

    try:
        image = load_image(args.image)
        regions = parse_region_args(args, image)
    except ImageLoadError as error:
        raise CliError(str(error)) from None

    from ferret.chat import FerretChat

    try:
        chat = FerretChat.from_pretrained(args.model_path, load_4bit=args.load_4bit, load_8bit=args.load_8bit,
                                          device=args.device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise CliError(f"cannot load the model: {error}") from None

    interactive = args.question is None
    questions = iter([args.question]) if not interactive else (line.rstrip("\n") for line in sys.stdin)
    from ferret.serve.engine import chat_history
    from ferret.serve.protocol import Turn

    turns: list[Turn] = []
    turn_regions, all_answer_regions = regions, []
    for question in questions:
        if not question.strip():
            break
        if interactive:
            print(f"USER: {question}\nASSISTANT: ", end="", flush=True)
        pieces = []
        try:
            for piece in chat.stream(image, question, regions=turn_regions, history=chat_history(turns, image.size),
                                     temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=args.max_new_tokens):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except ValueError as error:
            print(file=sys.stdout)
            raise CliError(str(error)) from None
        print(flush=True)
        answer = "".join(pieces).strip()
        turns.append(Turn(question, answer, turn_regions))
        all_answer_regions = chat.processor.post_process_generation(answer, image.size)
        print(format_grounding(all_answer_regions), file=sys.stderr)
        turn_regions = []
    if args.save_vis:
        _save_vis(args.save_vis, image, regions, all_answer_regions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
