"""Tiny Ferret models for tests and the quick start: same architecture, toy sizes, random weights.

Nothing here is downloaded: the vision tower comes from an embedded CLIPVisionConfig and the
tokenizer (when not given) is a BPE trained in-process on a small built-in corpus.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig

from ferret.constants import REGION_TOKEN
from ferret.model.configuration_ferret import FerretConfig
from ferret.model.modeling_ferret import FerretLlamaForCausalLM

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=112, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
)

# A few sentences in the style of Ferret conversations, enough for a small BPE vocabulary.
TINY_CORPUS = [
    "A chat between a human and an AI that understands visuals.",
    "USER: What is in the region [120, 340, 560, 880] <region_fea> ? ASSISTANT: A dog [100, 300, 550, 870].",
    "USER: <image>\nDescribe the image in detail. ASSISTANT: A cat sits on a red sofa next to a lamp.",
    "USER: Where is the ball? ASSISTANT: The ball [12, 40, 99, 120] is under the table [5, 30, 400, 500].",
    "USER: What is at the point [250, 750] <region_fea> ? ASSISTANT: It is a small bird on a branch.",
    "Increasing x moves right; y moves down. Bounding box: [x1, y1, x2, y2]. Image size: 1000x1000.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 , . ? ! [ ] : ;",
]


def tiny_config(
    vocab_size: int,
    region_token_id: int | None,
    *,
    region_geo_sampler: bool = True,
    feature_layout: str = "aligned",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **overrides,
) -> FerretConfig:
    """A FerretConfig with a 2-layer LLaMA (hidden 64) and a 2-layer CLIP tower (8x8 patches of 32)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        # Wider than LLaMA's 0.02 so that a random tiny model's output depends visibly on its
        # input (image, regions, text): tests comparing answers can then fail.
        initializer_range=0.2,
        mm_vision_tower="tiny-clip",
        mm_hidden_size=TINY_VISION["hidden_size"],
        vision_config=CLIPVisionConfig(**TINY_VISION).to_dict(),
        region_geo_sampler=region_geo_sampler,
        sampler_pooler_mode="max",
        im_region_fea_token=region_token_id,
        feature_layout=feature_layout,
        sampler_num_init_point=64,
        sampler_num_sub_point=[16, 8],
        sampler_num_neighbor=[6, 6],
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        architectures=["FerretLlamaForCausalLM"],
    )
    fields.update(overrides)
    return FerretConfig(**fields)


def build_tiny_tokenizer(save_dir: str | Path | None = None):
    """A BPE tokenizer (with `<region_fea>`) trained in-process on TINY_CORPUS."""
    from ferret.data.synthetic_tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(TINY_CORPUS, vocab_size=400, save_dir=save_dir)


def build_tiny_model(tokenizer=None, seed: int = 0, **config_overrides) -> tuple[FerretLlamaForCausalLM, object]:
    """(model, tokenizer): a random tiny Ferret whose vocabulary and special ids match the tokenizer."""
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    region_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    if region_id is None or region_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {REGION_TOKEN} token")
    config = tiny_config(
        vocab_size=len(tokenizer),
        region_token_id=region_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = FerretLlamaForCausalLM(config).eval()
    return model, tokenizer


def save_tiny_model(path: str | Path, tokenizer=None, seed: int = 0, safe_serialization: bool = True, **config_overrides) -> Path:
    """Write a random tiny Ferret (weights, config, tokenizer) to `path`; loadable by `load_pretrained`."""
    path = Path(path)
    model, tokenizer = build_tiny_model(tokenizer, seed=seed, **config_overrides)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    tokenizer.save_pretrained(path)
    return path
