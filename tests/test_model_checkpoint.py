"""Released-checkpoint compatibility: 7B/13B names and shapes, and loading the released folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

from ferret.model import FerretConfig, FerretLlamaForCausalLM
from ferret.model.tiny import TINY_VISION, build_tiny_model
from transformers import CLIPVisionConfig

VICUNA = {"ferret-7b": (4096, 11008, 32, 32), "ferret-13b": (5120, 13824, 40, 40)}
CLIP_L336_LAYER = {  # per-layer names and shapes of CLIP ViT-L/14-336 (transformers 4.x nesting)
    "self_attn.k_proj.weight": (1024, 1024), "self_attn.k_proj.bias": (1024,),
    "self_attn.v_proj.weight": (1024, 1024), "self_attn.v_proj.bias": (1024,),
    "self_attn.q_proj.weight": (1024, 1024), "self_attn.q_proj.bias": (1024,),
    "self_attn.out_proj.weight": (1024, 1024), "self_attn.out_proj.bias": (1024,),
    "layer_norm1.weight": (1024,), "layer_norm1.bias": (1024,),
    "mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,),
    "mlp.fc2.weight": (1024, 4096), "mlp.fc2.bias": (1024,),
    "layer_norm2.weight": (1024,), "layer_norm2.bias": (1024,),
}


def released_config(name: str) -> FerretConfig:
    hidden, intermediate, layers, heads = VICUNA[name]
    # The fields of the released config.json (no feature_layout, no vision_config).
    return FerretConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, vocab_size=32001, max_position_embeddings=2048, rms_norm_eps=1e-6,
        mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024,
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", region_geo_sampler=True,
        sampler_pooler_mode="max", im_region_fea_token=32000, mm_use_im_start_end=False,
        mm_use_im_patch_token=False, architectures=["FerretLlamaForCausalLM"],
    )


def expected_released_keys(name: str, fixture: dict) -> dict[str, tuple[int, ...]]:
    hidden, intermediate, layers, _ = VICUNA[name]
    keys = {k: tuple(v) for k, v in fixture["models"][name]["keys"].items()}
    keys["model.embed_tokens.weight"] = (32001, hidden)
    keys["model.norm.weight"] = (hidden,)
    keys["lm_head.weight"] = (32001, hidden)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys[prefix + f"self_attn.{proj}.weight"] = (hidden, hidden)
        keys[prefix + "mlp.gate_proj.weight"] = (intermediate, hidden)
        keys[prefix + "mlp.up_proj.weight"] = (intermediate, hidden)
        keys[prefix + "mlp.down_proj.weight"] = (hidden, intermediate)
        keys[prefix + "input_layernorm.weight"] = (hidden,)
        keys[prefix + "post_attention_layernorm.weight"] = (hidden,)
    tower = "model.vision_tower.vision_tower.vision_model."
    keys[tower + "embeddings.class_embedding"] = (1024,)
    keys[tower + "embeddings.patch_embedding.weight"] = (1024, 3, 14, 14)
    keys[tower + "embeddings.position_embedding.weight"] = (577, 1024)
    for norm in ("pre_layrnorm", "post_layernorm"):
        keys[tower + f"{norm}.weight"] = (1024,)
        keys[tower + f"{norm}.bias"] = (1024,)
    for i in range(24):
        for suffix, shape in CLIP_L336_LAYER.items():
            keys[tower + f"encoder.layers.{i}.{suffix}"] = shape
    return keys


@pytest.mark.parametrize("name", ["ferret-7b", "ferret-13b"])
def test_meta_model_has_exactly_the_released_names_and_shapes(name, shared_fixtures):
    fixture = json.loads((shared_fixtures / "ferret_sampler_keys.json").read_text())
    assert fixture["models"][name]["hidden_size"] == VICUNA[name][0]
    with torch.device("meta"):
        model = FerretLlamaForCausalLM(released_config(name))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_released_keys(name, fixture)
    assert sorted(set(got) - set(want)) == []
    assert sorted(set(want) - set(got)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert model.config.feature_layout == "official"
    assert model.get_vision_tower().num_patches == 576


def _write_released_layout(model: FerretLlamaForCausalLM, tokenizer, folder: Path, clip_folder: Path,
                           shards: int = 3, drop_tower: bool = False) -> None:
    """Sharded pytorch_model-0000X-of-0000Y.bin + index + config.json exactly as the release has them."""
    folder.mkdir(parents=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if drop_tower:
        state = {k: v for k, v in state.items() if not k.startswith("model.vision_tower.")}
    else:  # buffers that transformers-4.x era checkpoints carry
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    names = list(state)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[shard * per_shard : (shard + 1) * per_shard]}
        torch.save(part, folder / file)
        weight_map.update({k: file for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg = model.config
    released = {
        "_name_or_path": "ferret-tiny", "architectures": ["FerretLlamaForCausalLM"], "model_type": "ferret",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "initializer_range": 0.02, "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.31.0", "use_cache": True,
        "vocab_size": cfg.vocab_size, "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
        "use_mm_proj": True, "image_aspect_ratio": "square_nocrop",
        "mm_vision_tower": str(clip_folder), "mm_hidden_size": cfg.mm_hidden_size,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "region_geo_sampler": True, "sampler_pooler_mode": "max",
        "im_region_fea_token": cfg.im_region_fea_token,
        "sampler_num_init_point": cfg.sampler_num_init_point, "sampler_num_sub_point": cfg.sampler_num_sub_point,
        "sampler_num_neighbor": cfg.sampler_num_neighbor,
    }
    (folder / "config.json").write_text(json.dumps(released, indent=2))
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def official_tiny(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=5, feature_layout="official")


def test_released_layout_folder_loads_with_no_missing_or_unexpected_keys(official_tiny, tmp_path):
    model, tokenizer = official_tiny
    clip_folder = tmp_path / "clip"
    CLIPVisionConfig(**TINY_VISION).save_pretrained(clip_folder)
    _write_released_layout(model, tokenizer, tmp_path / "ferret", clip_folder)

    config = AutoConfig.from_pretrained(tmp_path / "ferret")
    assert isinstance(config, FerretConfig) and config.feature_layout == "official"
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ferret", output_loading_info=True)
    assert isinstance(loaded, FerretLlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(not p.requires_grad for p in loaded.get_vision_tower().parameters())  # frozen after loading too
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert set(original) == set(reloaded)
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    ids = torch.tensor([[tokenizer.bos_token_id, -200, 5, 6]])
    image = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, images=image).logits, model(input_ids=ids, images=image).logits)


def test_released_layout_without_tower_weights_takes_them_from_the_local_clip_folder(official_tiny, tmp_path):
    from ferret.model.builder import load_pretrained

    model, tokenizer = official_tiny
    clip_folder = tmp_path / "clip"
    tower = model.get_vision_tower().vision_tower.vision_model
    CLIPVisionModel(tower.config).save_pretrained(clip_folder)  # a different (fresh) init ...
    tower_copy = CLIPVisionModel.from_pretrained(clip_folder)
    _write_released_layout(model, tokenizer, tmp_path / "ferret", clip_folder, drop_tower=True)
    _, loaded, _, _ = load_pretrained(tmp_path / "ferret", device="cpu")
    got = loaded.get_vision_tower().vision_tower.vision_model.state_dict()
    want = tower_copy.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # ... is what the tower now holds


def test_save_pretrained_safetensors_round_trip(official_tiny, tmp_path):
    model, _ = official_tiny
    model.save_pretrained(tmp_path / "st")
    assert (tmp_path / "st" / "model.safetensors").is_file()
    loaded, info = FerretLlamaForCausalLM.from_pretrained(tmp_path / "st", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.vision_config == model.config.vision_config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
