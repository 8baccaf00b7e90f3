"""`load_pretrained`: folder validation errors, tokenizer checks, and 8-bit / 4-bit loading of a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from ferret.model import builder
from ferret.model.builder import CheckpointMismatchError, NoDefaultModelError, load_pretrained
from ferret.model.tiny import save_tiny_model

# Wider than the default tiny model so that every quantized Linear has >= 64 inputs (nf4 block
# size), with LLaMA's own init scale (the tiny default of 0.2 makes a chaotic random network that
# amplifies any rounding, unlike trained weights).
QUANT_SIZES = dict(hidden_size=128, intermediate_size=256, initializer_range=0.02)


@pytest.fixture(scope="module")
def tiny_folder(tiny_tokenizer, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "ferret", tokenizer=tiny_tokenizer, seed=3, **QUANT_SIZES)


@pytest.fixture(scope="module")
def fp32_reference(tiny_folder):
    tokenizer, model, processor, context_len = load_pretrained(tiny_folder, device="cpu")
    ids = torch.tensor([[tokenizer.bos_token_id, -200] + tokenizer.encode("what is this", add_special_tokens=False)])
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, images=images).logits
    return ids, images, logits, model.get_memory_footprint(), _decoder_bytes(model)


def _decoder_bytes(model) -> int:
    """Bytes of the (quantizable) decoder-layer weights as stored."""
    return sum(p.numel() * p.element_size() for p in model.model.layers.parameters())


def test_load_returns_tokenizer_model_processor_and_context(tiny_folder, fp32_reference):
    tokenizer, model, processor, context_len = load_pretrained(tiny_folder, device="cpu")
    assert tokenizer.convert_tokens_to_ids("<region_fea>") == model.config.im_region_fea_token
    assert model.dtype == torch.float32 and not model.training
    assert context_len == model.config.max_position_embeddings
    assert model.config._attn_implementation == "sdpa"
    pixels = processor(images=[__import__("PIL.Image").Image.new("RGB", (50, 30))], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 112, 112)


@pytest.mark.parametrize(
    "mode, min_cosine, max_relative, max_layer_ratio",
    # Measured on this model: 8-bit cosine 0.99995 / max rel. error ~1.7%, 4-bit 0.9966 / ~13%.
    [("8bit", 0.9995, 0.05, 0.26), ("4bit", 0.99, 0.3, 0.13)],
)
def test_quantized_logits_stay_close_and_memory_drops(tiny_folder, fp32_reference, mode, min_cosine, max_relative,
                                                      max_layer_ratio):
    import bitsandbytes as bnb

    ids, images, reference, fp32_bytes, fp32_layer_bytes = fp32_reference
    _, model, _, _ = load_pretrained(tiny_folder, load_8bit=mode == "8bit", load_4bit=mode == "4bit", device="cpu")
    quantized = {n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}
    assert quantized and all(name.startswith("model.layers.") for name in quantized)
    for name in ("mm_projector", "region_geo_sampler", "vision_tower"):  # kept unquantized
        module = getattr(model.model, name)
        assert all(p.dtype == torch.float32 for p in module.parameters())
    with torch.no_grad():
        logits = model(input_ids=ids, images=images).logits
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    relative = (logits - reference).abs().max() / reference.abs().max()
    assert cosine > min_cosine, f"{mode}: cosine {cosine:.5f}"
    assert relative < max_relative, f"{mode}: max relative error {relative:.4f}"
    # Decoder weights shrink 4x (int8) / 8x (nf4); the unquantized tower, projector, sampler,
    # embeddings and lm_head keep the whole-model ratio higher on a model this small.
    assert _decoder_bytes(model) <= max_layer_ratio * fp32_layer_bytes
    assert model.get_memory_footprint() < 0.6 * fp32_bytes


def test_missing_path_and_bad_folders(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type 'llama'.*'ferret'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ferret", "feature_layout": "diagonal"}))
    with pytest.raises(ValueError, match="feature_layout"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "ferret"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(tmp_path)
    monkeypatch.delenv("FERRET_MODEL_PATH", raising=False)
    # Without the embedded model folder (e.g. a stripped install) None is a clear error.
    monkeypatch.setattr(builder, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    with pytest.raises(NoDefaultModelError, match="embedded model folder"):
        load_pretrained(None)


def test_model_path_none_uses_the_environment_variable(tiny_folder, monkeypatch):
    monkeypatch.setenv("FERRET_MODEL_PATH", str(tiny_folder))
    _, model, _, _ = load_pretrained(None, device="cpu")
    assert model.config.hidden_size == QUANT_SIZES["hidden_size"]


def test_both_quantizations_at_once_is_an_error(tiny_folder):
    with pytest.raises(ValueError, match="one of load_8bit and load_4bit"):
        load_pretrained(tiny_folder, load_8bit=True, load_4bit=True)


def test_region_token_id_mismatch_is_reported(tiny_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["im_region_fea_token"] = 7
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="im_region_fea_token=7"):
        load_pretrained(broken, device="cpu")


def test_weights_of_another_shape_are_reported(tiny_folder, tmp_path, tiny_tokenizer):
    other = save_tiny_model(tmp_path / "other", tokenizer=tiny_tokenizer, hidden_size=64, intermediate_size=128)
    config = json.loads((tiny_folder / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config))  # a 128-wide config over 64-wide weights
    with pytest.raises(CheckpointMismatchError, match=r"mismatched \['lm_head.weight'"):
        load_pretrained(other, device="cpu")


def test_attention_implementation_choice(monkeypatch):
    import importlib.util

    from ferret.model import builder

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(builder.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert builder.default_attn_implementation(torch.device("cuda")) == "flash_attention_2"
    assert builder.default_attn_implementation(torch.device("cpu")) == "sdpa"
    monkeypatch.setattr(builder.importlib.util, "find_spec", lambda name, *a: None)
    assert builder.default_attn_implementation(torch.device("cuda")) == "sdpa"
