"""Workers with 8-bit and 4-bit (nf4) LLM weights through bitsandbytes on CPU: smaller reported
footprint, quantized layers, and answers that stream like the full-precision worker's."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ferret.serve.engine import ChatEngine
from ferret.serve.model_worker import ModelWorker, build_app
from ferret.serve.protocol import iter_chunks

pytest.importorskip("bitsandbytes", reason="8/4-bit serving needs bitsandbytes (pip install 'ferret-kernels[demo]')")

SHAPES = Path(__file__).resolve().parents[1] / "ferret" / "assets" / "examples" / "shapes.png"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from ferret.model.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("quant") / "tiny-ferret")


@pytest.fixture(scope="module")
def full_footprint(model_path):
    return ChatEngine.load(model_path, device="cpu").memory_bytes


@pytest.mark.parametrize("bits, layer_class", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_worker_reports_smaller_footprint_and_answers(model_path, full_footprint, bits, layer_class):
    engine = ChatEngine.load(model_path, load_8bit=bits == "8bit", load_4bit=bits == "4bit", device="cpu")
    assert engine.quantization == bits
    assert type(engine.model.model.layers[0].self_attn.q_proj).__name__ == layer_class
    assert engine.memory_bytes < full_footprint
    worker = ModelWorker(engine, "http://127.0.0.1:1")
    with TestClient(build_app(worker)) as client:
        status = client.post("/worker_get_status").json()
        assert status["quantization"] == bits and status["memory_bytes"] == engine.memory_bytes
        response = client.post("/worker_generate_stream", json={
            "image": base64.b64encode(SHAPES.read_bytes()).decode(), "question": "What is <region>?",
            "regions": [{"type": "box", "box": [50, 60, 150, 160]}], "max_new_tokens": 5,
        })
        assert response.status_code == 200
        chunks = list(iter_chunks(response.iter_lines()))
    assert chunks[-1]["done"] and chunks[-1]["error_code"] == 0


def test_worker_command_line_refuses_both_quantizations(capsys):
    from ferret.serve.model_worker import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--load-4bit", "--load-8bit"])
    assert "not allowed with argument" in capsys.readouterr().err
