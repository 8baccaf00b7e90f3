"""A new Ferret assembled as the released run starts: LLaMA folder + CLIP folder + LLaVA projector."""

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from ferret.training.config import TrainConfigError, config_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from ferret.model.tiny import TINY_VISION, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("parts")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    # A "Vicuna" whose vocabulary lacks the last token (<image>/<region_fea> come last): it must grow.
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) - 1, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256))
    llama.save_pretrained(root / "vicuna")
    tokenizer.save_pretrained(root / "vicuna")
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    clip.save_pretrained(root / "clip")
    projector = {"model.mm_projector.weight": torch.randn(64, TINY_VISION["hidden_size"]),
                 "model.mm_projector.bias": torch.randn(64)}
    torch.save(projector, root / "mm_projector.bin")
    return root, llama, clip, projector


def config_for(root: Path, **model):
    return config_from_dict({
        "model": {"base_llm": str(root / "vicuna"), "vision_tower": str(root / "clip"),
                  "mm_projector": str(root / "mm_projector.bin"), **model},
        "data": {"data_path": ["unused.json"]},
    })


def test_assembled_model_holds_each_part(parts):
    root, llama, clip, projector = parts
    from ferret.training.model_setup import build_model
    model, tokenizer, image_processor = build_model(config_for(root))
    state = model.state_dict()
    vocab = llama.config.vocab_size
    assert model.config.vocab_size == len(tokenizer) == vocab + 1
    assert model.config.im_region_fea_token == tokenizer.convert_tokens_to_ids("<region_fea>")
    for name, tensor in llama.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(state[name][:vocab], tensor)
            torch.testing.assert_close(state[name][vocab], tensor.mean(dim=0))  # new row = mean of the old
        else:
            torch.testing.assert_close(state[name], tensor, msg=name)
    tower = model.get_vision_tower().vision_tower.vision_model.state_dict()
    assert len(tower) == len(clip.state_dict())
    for name, tensor in clip.state_dict().items():
        torch.testing.assert_close(tower[name], tensor, msg=name)
    torch.testing.assert_close(state["model.mm_projector.weight"], projector["model.mm_projector.weight"])
    assert any(name.startswith("model.region_geo_sampler.") for name in state)
    assert image_processor.size["height"] == clip.config.image_size


def test_bad_parts_are_named(parts, tmp_path):
    root = parts[0]
    from ferret.training.model_setup import build_model
    with pytest.raises(FileNotFoundError, match="model.base_llm: folder"):
        build_model(config_for(tmp_path))
    bad = tmp_path / "bad.bin"
    torch.save({"something.else": torch.zeros(1)}, bad)
    with pytest.raises(TrainConfigError, match="model.mm_projector"):
        build_model(config_for(root, mm_projector=str(bad)))
