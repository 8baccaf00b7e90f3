"""The `ferret` console script: `ask` on a saved tiny model, `demo`, and one-line exit-2 errors."""

from __future__ import annotations

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
def test_ask_prints_answer_and_regions(model_dir, region, capsys, monkeypatch):
    monkeypatch.delenv("FERRET_MODEL_PATH", raising=False)
    code = main(["ask", "--image", str(SHAPES), *region, "--model-path", str(model_dir), "--device", "cpu",
                 "--max-new-tokens", "4", "What is <region>?" if region else "What is this?"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("Answer: ") and "Grounded regions" in out


def test_ask_with_a_mask_file(model_dir, tmp_path, capsys):
    mask = np.zeros((300, 400), dtype=np.uint8)
    mask[100:150, 60:140] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code = main(["ask", "--image", str(SHAPES), "--mask", str(tmp_path / "mask.png"), "--model-path", str(model_dir),
                 "--device", "cpu", "--max-new-tokens", "3", "What is this?"])
    assert code == 0 and "Answer: " in capsys.readouterr().out


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
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("FERRET_MODEL_PATH", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferret: error: ") and message in err and err.count("\n") == 1, err


def test_argument_errors_exit_2_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--image", str(SHAPES), "--box", "1,2,3,4", "--point", "1,2", "q"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and err.count("\n") == 1


def test_demo_runs_fast_and_says_the_model_is_random():
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ferret", "demo", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert "RANDOMLY INITIALISED" in proc.stdout and "meaningless" in proc.stdout, proc.stdout
    assert "[125, 200, 375, 533] <region_fea>" in proc.stdout  # the region went into the prompt
    assert "Answer: " in proc.stdout and "Traceback" not in proc.stderr
    assert elapsed < 60, f"demo took {elapsed:.1f} s"
