"""The `ferret` console script: `ask` (the serve CLI under another name) on a saved tiny model, `try`,
`demo` routing, and one-line exit-2 errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferret.__main__ import main
from ferret.model.tiny import save_tiny_model

SHAPES = Path(__file__).resolve().parents[1] / "ferret" / "assets" / "examples" / "shapes.png"


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "tiny", tokenizer=tiny_tokenizer, seed=1)


@pytest.mark.parametrize("region", [["--box", "50,60,150,160"], ["--point", "100,110"], []])
def test_ask_is_the_serve_cli_under_another_name(model_dir, region, capsys, monkeypatch):
    from ferret.serve import cli

    monkeypatch.delenv("FERRET_MODEL_PATH", raising=False)
    args = ["--image", str(SHAPES), *region, "--model-path", str(model_dir), "--device", "cpu",
            "--max-new-tokens", "4", "What is <region>?" if region else "What is this?"]
    assert main(["ask", *args]) == 0
    ask_out, ask_err = capsys.readouterr()
    assert cli.main(args) == 0
    cli_out, cli_err = capsys.readouterr()
    assert ask_out.strip() and ask_out == cli_out  # same streamed answer (greedy)

    def grounding_report(err: str) -> str:  # stderr after the weight-loading progress bar
        return err[err.index("Grounded regions"):]

    assert grounding_report(ask_err) == grounding_report(cli_err)


def test_ask_with_a_mask_file(model_dir, tmp_path, capsys):
    mask = np.zeros((300, 400), dtype=np.uint8)
    mask[100:150, 60:140] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code = main(["ask", "--image", str(SHAPES), "--mask", str(tmp_path / "mask.png"), "--model-path", str(model_dir),
                 "--device", "cpu", "--max-new-tokens", "3", "What is this?"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() and "Grounded regions" in err


def test_ask_help_names_the_ask_command(capsys):
    assert main(["ask", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ferret ask") and "--save-vis" in out and "--mask" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ask" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "--image", "no/such.png", "q"], "does not exist"),
        (["ask", "--image", str(SHAPES), "--box", "1,2,3", "q"], "--box needs 4"),
        (["ask", "--image", str(SHAPES), "--box", "10,10,5,20", "q"], "malformed"),
        (["ask", "--image", str(SHAPES), "--point", "900,3", "q"], "outside"),
        (["ask", "--image", str(SHAPES), "--model-path", "no/such/model", "q"], "does not exist"),
        (["ask", "--image", str(SHAPES), "q"], "no model path given"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    from ferret.model import builder

    monkeypatch.delenv("FERRET_MODEL_PATH", raising=False)
    # "no model path given" needs the embedded model gone too (a stripped install).
    monkeypatch.setattr(builder, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferret: error: ") and message in err and err.count("\n") == 1, err


def test_argument_errors_exit_2_in_one_line(capsys):
    assert main(["ask", "--image", str(SHAPES), "--box", "1,2,3,4", "--point", "1,2", "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferret ask: error: ") and "not allowed with argument" in err and err.count("\n") == 1


def test_try_runs_fast_and_answers_with_the_default_model():
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "FERRET_MODEL_PATH"}
    proc = subprocess.run([sys.executable, "-m", "ferret", "try", "--max-new-tokens", "24"],
                          capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert "assets/model" in proc.stdout and "RANDOM" not in proc.stdout, proc.stdout  # the embedded model
    assert "[125, 200, 375, 533] <region_fea>" in proc.stdout  # the region went into the prompt
    # Both questions answered in the trained formats: an object name, then an object name and its
    # box, reported in pixels; the embedded model grounds the blue square (issue 13; its accuracy
    # over many scenes is MODEL_CARD.md's and tests/test_embedded_model.py's business).
    name = r"(red|green|blue|yellow|purple|orange|pink|cyan) (circle|square|triangle|star|cross|ring)"
    assert re.search(r"Answer: An? " + name + r"\.", proc.stdout), proc.stdout
    assert re.search(r"Answer: The " + name + r" \[\d+, \d+, \d+, \d+\]", proc.stdout), proc.stdout
    assert re.search(r"The " + name + r": \[", proc.stdout), proc.stdout
    grounding = re.search(r"Grounding: IoU (\d\.\d\d) with the true box \((grounded|missed)", proc.stdout)
    assert grounding and float(grounding.group(1)) >= 0.5 and grounding.group(2) == "grounded", proc.stdout
    assert "Traceback" not in proc.stderr
    assert elapsed < 60, f"demo took {elapsed:.1f} s"


def test_try_without_any_model_says_the_model_is_random(monkeypatch, capsys, tmp_path):
    from ferret.model import builder

    monkeypatch.delenv("FERRET_MODEL_PATH", raising=False)
    monkeypatch.setattr(builder, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    assert main(["try", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in out and "meaningless" in out, out
    assert "[125, 200, 375, 533] <region_fea>" in out and "Answer: " in out


def test_grounding_verdict_reports_iou_against_the_true_box():
    from ferret.__main__ import grounding_verdict
    from ferret.regions import GroundedRegion

    def region(box):
        return GroundedRegion(phrase="the x", box=box, point=None, grid=(0, 0, 0, 0), span=(0, 1))

    assert grounding_verdict([region((0.0, 0.0, 10.0, 10.0))], [0, 0, 10, 10]).startswith("Grounding: IoU 1.00")
    assert "(grounded" in grounding_verdict([region((0.0, 0.0, 10.0, 10.0))], [0, 0, 10, 12])
    assert "(missed" in grounding_verdict([region((0.0, 0.0, 10.0, 10.0))], [20, 20, 30, 30])
    assert grounding_verdict([], [0, 0, 1, 1]) == "Grounding: no box in the answer"


def test_demo_is_the_serving_stack_launcher(capsys, tmp_path):
    # `ferret demo` hands its arguments to ferret.serve.demo, which refuses a missing model
    # folder before starting any process.
    missing = tmp_path / "no-such-model"
    assert main(["demo", "--model-path", str(missing)]) == 2
    assert "is not a folder" in capsys.readouterr().err
