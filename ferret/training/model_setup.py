"""The model a run trains: built from the configured source, then frozen / LoRA-wrapped as configured."""

from __future__ import annotations

from pathlib import Path

import torch

from ferret.training.config import TrainConfig, TrainConfigError, resolve_path


def unwrap(model):
    """The Ferret model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def assemble_from_parts(cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a new Ferret from a LLaMA/Vicuna folder, a CLIP folder and LLaVA's projector.

    As the released run starts: `<region_fea>` appended to the vocabulary (its embedding row
    the mean of the others), CLIP weights in the tower, the pretrained projector if given,
    and a randomly initialised region sampler.
    """
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig

    from ferret.constants import REGION_TOKEN
    from ferret.model import FerretConfig, FerretLlamaForCausalLM

    base, clip = resolve_path(cfg.model.base_llm), resolve_path(cfg.model.vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(base)
    llama = LlamaConfig.from_pretrained(base).to_dict()
    vocab = llama["vocab_size"]
    vision = CLIPVisionConfig.from_pretrained(clip)
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        llama.pop(key, None)
    config = FerretConfig(
        **llama, mm_vision_tower=clip, mm_hidden_size=vision.hidden_size, vision_config=vision.to_dict(),
        region_geo_sampler=True, sampler_pooler_mode="max", feature_layout=cfg.model.feature_layout,
        architectures=["FerretLlamaForCausalLM"],
    )
    # Weights not in the LLaMA folder (tower, projector, sampler) start at their initialisers.
    model = FerretLlamaForCausalLM.from_pretrained(base, config=config, dtype=dtype)
    if REGION_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([REGION_TOKEN], special_tokens=True)
    if len(tokenizer) > vocab:
        # New rows = the mean of the old ones, in the input and output embeddings (released
        # `smart_tokenizer_and_embedding_resize`).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
                matrix[vocab:] = matrix[:vocab].mean(dim=0, keepdim=True)
    model.config.im_region_fea_token = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.get_vision_tower().load_clip_weights(clip)
    if cfg.model.mm_projector:
        state = torch.load(resolve_path(cfg.model.mm_projector), map_location="cpu", weights_only=True)
        # LLaVA saves "model.mm_projector.weight" (sometimes without the "model." prefix).
        weights = {k.split("mm_projector.")[-1]: v for k, v in state.items() if "mm_projector." in k}
        if set(weights) != {"weight", "bias"}:
            raise TrainConfigError(f"model.mm_projector: {cfg.model.mm_projector} holds {sorted(state)[:4]}, "
                                   "not mm_projector.weight/bias")
        model.model.mm_projector.load_state_dict(weights)
    return model, tokenizer


def check_model_paths(cfg: TrainConfig) -> None:
    """Every configured model folder and file exists (an error names the key)."""
    m = cfg.model
    for key, value in (("model.pretrained", m.pretrained), ("model.tokenizer", m.tokenizer),
                       ("model.base_llm", m.base_llm), ("model.vision_tower", m.vision_tower)):
        if value and not Path(resolve_path(value)).is_dir():
            raise FileNotFoundError(f"{key}: folder {value} does not exist")
    for key, value in (("model.mm_projector", m.mm_projector), ("model.vision_tower_weights", m.vision_tower_weights)):
        if value and not Path(resolve_path(value)).is_file():
            raise FileNotFoundError(f"{key}: file {value} does not exist")


def build_model(cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, image_processor) from the configured source (see ModelSection).

    Pretrained weights load in `dtype` (bf16 for bf16 runs: half the host memory per rank).
    """
    from ferret.model.builder import load_pretrained
    from ferret.processing import build_image_processor

    m = cfg.model
    check_model_paths(cfg)
    if m.pretrained:
        tokenizer, model, image_processor, _ = load_pretrained(resolve_path(m.pretrained), device="cpu", dtype=dtype)
    elif m.base_llm:
        model, tokenizer = assemble_from_parts(cfg, dtype)
        image_processor = build_image_processor(model.config.vision_tower_config().image_size)
    else:
        from ferret.model.tiny import build_tiny_model

        tokenizer = None
        if cfg.model.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.model.tokenizer))
        model, tokenizer = build_tiny_model(tokenizer, seed=cfg.model.init_seed, **cfg.model.tiny_overrides)
        image_processor = build_image_processor(model.config.vision_tower_config().image_size)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token
    if m.vision_tower_weights:
        load_vision_tower_weights(model, resolve_path(m.vision_tower_weights), dtype)
    model.config.use_cache = False
    return model, tokenizer, image_processor


def load_vision_tower_weights(model, path: str, dtype: torch.dtype) -> None:
    """`model.vision_tower_weights`: a state dict of the tower (or {"tower": state dict})."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    tower = model.get_vision_tower()
    try:
        tower.load_state_dict(state.get("tower", state) if isinstance(state, dict) else state)
    except RuntimeError as err:
        raise TrainConfigError(f"model.vision_tower_weights: {path} does not fit the configured tower: "
                               f"{str(err).splitlines()[0]}") from None
    tower.to(dtype)


def prepare_trainable(model, cfg: TrainConfig, rank: int):
    """Freeze (or unfreeze) the vision tower, optionally wrap the LLM in LoRA, switch on gradient checkpointing."""
    tower = model.get_vision_tower()
    if tower is not None:
        # Both ways: a built or loaded model arrives with its tower frozen, so unfreezing
        # (model.freeze_vision_tower: false, e.g. a tower trained from scratch) must be explicit.
        tower.requires_grad_(not cfg.model.freeze_vision_tower)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-grad hook, even with a frozen embedding (LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enable:
        from peft import LoraConfig, get_peft_model

        # LoRA on every Linear of the LLaMA decoder layers; lm_head, embeddings, vision tower,
        # projector and region module get none.
        targets = sorted(
            name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
        )
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, bias="none")
        model = get_peft_model(model, lora)
        # peft froze everything else; the projector and the region module train fully.
        inner = unwrap(model).model
        for module in (inner.mm_projector, inner.region_module):
            module.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if rank == 0:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
        print(f"[ferret_train] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
              f"{', LoRA' if cfg.lora.enable else ''}{', gradient checkpointing' if checkpointing else ''}")
    return model
