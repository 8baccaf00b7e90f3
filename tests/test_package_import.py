"""`import ferret` alone makes the shipped model folder loadable through transformers' Auto classes."""

import os
import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "ferret" / "assets" / "model"

LOAD = """
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r})
print(type(model).__name__, model.config.model_type, model.model.region_module is not None)
"""


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_import_ferret_alone_registers_the_auto_classes():
    proc = run_fresh("import ferret\n" + LOAD.format(path=str(MODEL)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["FerretLlamaForCausalLM", "ferret", "True"]


def test_without_import_ferret_the_model_type_is_unknown():
    # the control: a fresh interpreter that never imports ferret cannot read the folder
    proc = run_fresh(LOAD.format(path=str(MODEL)))
    assert proc.returncode != 0 and "ferret" in proc.stderr


def test_top_level_names_load_lazily():
    import ferret
    from ferret.processing import FerretProcessor

    assert ferret.FerretProcessor is FerretProcessor
    for name in ferret.__all__:
        assert getattr(ferret, name) is not None, name
