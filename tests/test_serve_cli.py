"""`python -m ferret.serve.cli`: bad input -> one stderr line and exit 2; questions with a box,
point or mask; interactive multi-turn from stdin; --save-vis."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ferret.serve.cli import main
from ferret.serve.drawing import PALETTE

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "ferret" / "assets" / "examples" / "shapes.png"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ferret.model.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("cli") / "tiny-ferret")


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--image", "missing.png"], "does not exist"),
        (["--image", SHAPES, "--box", "10,10,5"], "--box needs 4 comma-separated numbers"),
        (["--image", SHAPES, "--box", "a,b,c,d"], "--box needs numbers"),
        (["--image", SHAPES, "--box", "500,400,600,500"], "wholly outside the 400x300 image"),
        (["--image", SHAPES, "--box", "30,30,10,10"], "malformed"),
        (["--image", SHAPES, "--point", "400,10"], "outside the 400x300 image"),
        (["--image", SHAPES, "--max-new-tokens", "0"], "--max-new-tokens >= 1"),
        (["--image", SHAPES, "--save-vis", "/no/such/dir/out.png"], "does not exist"),
        (["--image", SHAPES, "--model-path", "/no/such/model"], "cannot load the model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, fragment, capsys):
    code, out, err = run([*extra, "What is it?"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ferret-cli: error: ") and fragment in err, err
    assert "Traceback" not in err and out == ""


def test_corrupt_image_and_bad_mask(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    code, _, err = run(["--image", corrupt, "q"], capsys)
    assert code == 2 and ("corrupt" in err or "not a readable image" in err), err
    small = tmp_path / "small_mask.png"
    Image.new("L", (10, 10), 255).save(small)
    code, _, err = run(["--image", SHAPES, "--mask", small, "q"], capsys)
    assert code == 2 and "--mask is 10x10 but the image is 400x300" in err
    empty = tmp_path / "empty_mask.png"
    Image.new("L", (400, 300), 0).save(empty)
    code, _, err = run(["--image", SHAPES, "--mask", empty, "q"], capsys)
    assert code == 2 and "empty" in err


def test_argparse_errors_exit_2_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "ferret.serve.cli", "--image", str(SHAPES), "--box", "1,2,3,4", "--point", "1,2", "q"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert "Traceback" not in result.stderr


def test_question_with_box_streams_answer_and_saves_visualisation(tiny_model, tmp_path, capsys):
    out_png = tmp_path / "vis.png"
    code, out, err = run(["--image", SHAPES, "--box", "50,60,150,160", "--model-path", tiny_model,
                          "--max-new-tokens", "6", "--save-vis", out_png, "What is <region>?"], capsys)
    assert code == 0, err
    from ferret.chat import FerretChat
    from ferret.regions import Box

    expected = FerretChat.from_pretrained(tiny_model, device="cpu").ask(
        SHAPES, "What is <region>?", regions=[Box(50, 60, 150, 160)], max_new_tokens=6).text
    assert out.strip() == expected.strip()
    picture = Image.open(out_png).convert("RGB")
    assert picture.size == (400, 300) and picture.getpixel((50, 110)) == PALETTE[0]


def test_mask_and_point_regions(tiny_model, tmp_path, capsys):
    mask = tmp_path / "mask.png"
    canvas = Image.new("L", (400, 300), 0)
    canvas.paste(255, (60, 70, 140, 150))
    canvas.save(mask)
    for region in (["--mask", mask], ["--point", "100,110"]):
        code, out, err = run(["--image", SHAPES, *region, "--model-path", tiny_model, "--max-new-tokens", "3",
                              "What is <region>?"], capsys)
        assert code == 0, err


def test_interactive_multi_turn_from_stdin(tiny_model, capsys, monkeypatch):
    code, out, err = run(["--image", SHAPES, "--point", "100,110", "--model-path", tiny_model, "--max-new-tokens", "4"],
                         capsys, stdin="What is <region>?\nAnd what colour is it?\n\nignored after blank line\n",
                         monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.count("USER: ") == 2 and out.count("ASSISTANT: ") == 2
    assert "ignored" not in out


def test_grounding_report_is_in_image_pixels():
    from ferret.regions import parse_grounding
    from ferret.serve.cli import format_grounding

    # Grid 0-999 -> pixels of a 400x300 image: g * side / 1000.
    regions = parse_grounding("The blue square [250, 500, 500, 999] and a dot [100, 200].", 400, 300)
    assert format_grounding(regions) == ("Grounded regions (image pixels):\n"
                                         "  The blue square: [100.0, 150.0, 200.0, 299.7]\n"
                                         "  a dot: [40.0, 60.0]")
    assert format_grounding([]) == "Grounded regions: none"
