"""Train Ferret with DeepSpeed, nanoGPT style: one file, read it top to bottom.

    torchrun --nproc_per_node=8 train/ferret_train.py --config train/configs/ferret_7b.yaml
    torchrun --nproc_per_node=2 train/ferret_train.py --config train/configs/small.yaml \
        train.max_steps=20 train.deepspeed=train/configs/ds_zero3.json
    torchrun ... train/ferret_train.py --config CONFIG --resume        # continue from `latest`

Multi-node: torchrun's own flags (--nnodes, --node_rank, --rdzv_endpoint ...); the output
folder must be on a file system shared by all nodes. Backend: nccl + bf16 on GPU, gloo + fp32
on CPU. The vision tower is frozen; projector, region sampler and LLM are trained (or LoRA on
the LLM with projector and sampler fully trained). See ferret/training_config.py for every key.

Test hooks (environment): FERRET_TRAIN_CRASH_AT_STEP=k makes rank 0 exit hard right after
optimizer step k; FERRET_TRAIN_CRASH_IN_SAVE=k makes it exit while checkpoint k is staged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The JIT-built DeepSpeed comm op is cached here instead of being rebuilt (~30 s) on every start.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ferret" / "torch_extensions"))

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# DeepSpeed's ZeRO code calls a collective that torch deprecates; one warning per step is noise.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
import torch.distributed as dist  # noqa: E402

from ferret.checkpoint import (  # noqa: E402
    CheckpointError,
    TrainerState,
    consolidated_state_dict,
    export_hf_folder,
    load_deepspeed_checkpoint,
    merge_lora_state_dict,
    prune_checkpoints,
    read_latest,
    save_deepspeed_checkpoint,
)
from ferret.training_config import TrainConfig, TrainConfigError, config_to_dict, load_train_config  # noqa: E402


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="yaml or json training config")
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None,
        help="continue from the run's latest checkpoint (or from the checkpoint folder given)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.learning_rate=1e-4")
    return parser.parse_args(argv)


def resolve(path: str) -> str:
    """Config paths are relative to the working directory, falling back to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    return str(REPO_ROOT / p) if (REPO_ROOT / p).exists() else str(p)


# --------------------------------------------------------------------------- model


def assemble_from_parts(cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a new Ferret from a LLaMA/Vicuna folder, a CLIP folder and LLaVA's projector.

    As the released run starts: `<region_fea>` appended to the vocabulary (its embedding row
    the mean of the others), CLIP weights in the tower, the pretrained projector if given,
    and a randomly initialised region sampler.
    """
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig

    from ferret.constants import REGION_TOKEN
    from ferret.model import FerretConfig, FerretLlamaForCausalLM

    base, clip = resolve(cfg.model.base_llm), resolve(cfg.model.vision_tower)
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
        state = torch.load(resolve(cfg.model.mm_projector), map_location="cpu", weights_only=True)
        # LLaVA saves "model.mm_projector.weight" (sometimes without the "model." prefix).
        weights = {k.split("mm_projector.")[-1]: v for k, v in state.items() if "mm_projector." in k}
        if set(weights) != {"weight", "bias"}:
            raise TrainConfigError(f"model.mm_projector: {cfg.model.mm_projector} holds {sorted(state)[:4]}, "
                                   "not mm_projector.weight/bias")
        model.model.mm_projector.load_state_dict(weights)
    return model, tokenizer


def build_model(cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, image_processor) from the configured source (see ModelSection).

    Pretrained weights load in `dtype` (bf16 for bf16 runs: half the host memory per rank).
    """
    from ferret.model.builder import load_pretrained
    from ferret.processing import build_image_processor

    m = cfg.model
    for key, value in (("model.pretrained", m.pretrained), ("model.tokenizer", m.tokenizer),
                       ("model.base_llm", m.base_llm), ("model.vision_tower", m.vision_tower)):
        if value and not Path(resolve(value)).is_dir():
            raise FileNotFoundError(f"{key}: folder {value} does not exist")
    if m.mm_projector and not Path(resolve(m.mm_projector)).is_file():
        raise FileNotFoundError(f"model.mm_projector: file {m.mm_projector} does not exist")
    if m.pretrained:
        tokenizer, model, image_processor, _ = load_pretrained(resolve(m.pretrained), device="cpu", dtype=dtype)
    elif m.base_llm:
        model, tokenizer = assemble_from_parts(cfg, dtype)
        image_processor = build_image_processor(model.config.vision_tower_config().image_size)
    else:
        from ferret.model.tiny import build_tiny_model

        tokenizer = None
        if cfg.model.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.tokenizer))
        model, tokenizer = build_tiny_model(tokenizer, seed=cfg.model.init_seed, **cfg.model.tiny_overrides)
        image_processor = build_image_processor(model.config.vision_tower_config().image_size)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token
    if m.vision_tower_weights:
        path = resolve(m.vision_tower_weights)
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.vision_tower_weights: file {m.vision_tower_weights} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        tower = model.get_vision_tower()
        try:
            tower.load_state_dict(state.get("tower", state) if isinstance(state, dict) else state)
        except RuntimeError as err:
            raise TrainConfigError(f"model.vision_tower_weights: {path} does not fit the configured tower: "
                                   f"{str(err).splitlines()[0]}") from None
        tower.to(dtype)
    model.config.use_cache = False
    return model, tokenizer, image_processor


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
        # projector and sampler get none.
        targets = sorted(
            name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
        )
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, bias="none")
        model = get_peft_model(model, lora)
        # peft froze everything else; the projector and the region module train fully.
        for name, param in model.named_parameters():
            if ".mm_projector." in name or ".region_geo_sampler." in name or ".region_fea_adapter." in name:
                param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if rank == 0:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
        print(f"[ferret_train] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
              f"{', LoRA' if cfg.lora.enable else ''}{', gradient checkpointing' if checkpointing else ''}")
    return model


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors), as HF Trainer does."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup from 0, then cosine to 0 (HF `get_cosine_schedule_with_warmup`, as released) or constant."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------- data


def build_dataset(cfg: TrainConfig, tokenizer, image_processor, model):
    from ferret.data.grit import DataSource, GritDataConfig, GritDataset

    multiples = cfg.data.data_multiple or [None] * len(cfg.data.data_path)
    folders = [resolve(f) for f in cfg.data.image_folder] or [None] * len(cfg.data.data_path)
    sources = [
        DataSource(path=resolve(p), image_folder=f, multiple=m)
        for p, f, m in zip(cfg.data.data_path, folders, multiples)
    ]
    data_config = GritDataConfig(
        point_strategy=cfg.data.point_input_sample, max_length=cfg.data.model_max_length, seed=cfg.train.seed
    )
    patch_targets = None
    if cfg.data.scene_records:
        from ferret.dense_supervision import ScenePatchTargets

        path = resolve(cfg.data.scene_records)
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.scene_records: file {cfg.data.scene_records} does not exist")
        patch_targets = ScenePatchTargets.from_file(path, grid=model.get_vision_tower().grid_size)
    return GritDataset.from_sources(sources, tokenizer, image_processor, data_config, patch_targets=patch_targets)


class DenseReadout:
    """The dense auxiliary loss (ferret.dense_supervision) on the projected image tokens and the
    region embeddings of the forward pass just run, captured by hooks (the model is not modified).
    A training step runs the region module once, on every image in batch order (see
    FerretLlamaForCausalLM.prepare_multimodal_inputs), so its output lines up with the batch."""

    def __init__(self, model, tokenizer):
        from ferret.dense_supervision import DenseVocabulary, NameDirections

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.vocabulary = DenseVocabulary.synthetic()
        if base.config.hidden_size < self.vocabulary.channels:
            raise TrainConfigError(f"train.dense_loss_weight: the readout needs {self.vocabulary.channels} channels "
                                   f"of the image tokens, the model's hidden_size is {base.config.hidden_size}")
        self.embeddings = base.get_input_embeddings()
        try:
            self.name_ids = NameDirections.token_ids(tokenizer, self.vocabulary)
        except ValueError as err:
            raise TrainConfigError(f"train.dense_loss_weight: {err}") from None
        self.tokens: torch.Tensor | None = None
        self.regions: list | None = None
        self.lm_head = base.get_output_embeddings()
        self.box_code: tuple[torch.Tensor, float, float] | None = None  # (number ids, weight, sigma)
        base.model.mm_projector.register_forward_hook(self._capture_tokens)
        region_module = getattr(base.model, "region_geo_sampler", None)
        if region_module is not None:
            region_module.register_forward_hook(self._capture_regions)

    def _capture_tokens(self, _module, _inputs, output) -> None:
        self.tokens = output

    def _capture_regions(self, _module, _inputs, output) -> None:
        self.regions = output

    def box_code_term(self, tokens: torch.Tensor, patch_box: torch.Tensor, covered: torch.Tensor,
                       number_rows: torch.Tensor | None = None) -> torch.Tensor:
        """weight x ferret.training.grounding.box_code_loss (0 without a box code)."""
        if self.box_code is None:
            return tokens.new_zeros((), dtype=torch.float32)
        from ferret.training.grounding import box_code_loss

        ids, weight, sigma = self.box_code
        rows = number_rows if number_rows is not None else self.lm_head.weight[ids.to(self.lm_head.weight.device)]
        return weight * box_code_loss(tokens, patch_box, covered, rows, sigma)

    def loss(self, batch: dict, device: torch.device) -> torch.Tensor:
        from ferret.dense_supervision import NameDirections, class_readout_loss, dense_readout_loss

        tokens, regions, self.tokens, self.regions = self.tokens, self.regions, None, None
        if tokens is None or "patch_color" not in batch:
            raise RuntimeError("dense readout: no image tokens or no patch targets in this batch")
        # The word embeddings move every step: the name directions are read afresh (gathered
        # first under ZeRO-3, which keeps only a shard of each weight between forwards).
        weight = self.embeddings.weight
        gathered = contextlib.nullcontext()
        if weight.numel() == 0:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([weight])
        with gathered:
            directions = NameDirections.from_embeddings(weight, self.name_ids)
        loss = dense_readout_loss(tokens, batch["patch_color"].to(device), batch["patch_shape"].to(device),
                                  batch["patch_box"].to(device), self.vocabulary, directions)
        loss = loss + self.box_code_term(tokens, batch["patch_box"].to(device), batch["patch_color"].to(device) > 0)
        if regions is not None and "region_color" in batch:
            if len(regions) != len(batch["region_color"]):
                raise RuntimeError(f"dense readout: the region module returned {len(regions)} entries for a batch "
                                   f"of {len(batch['region_color'])}; it must run once on every image")
            rows = [i for i, c in enumerate(batch["region_color"]) if len(c)]
            if rows:
                embeddings = torch.cat([regions[i][: len(batch["region_color"][i])] for i in rows])
                color = torch.cat([batch["region_color"][i] for i in rows]).to(device)
                shape = torch.cat([batch["region_shape"][i] for i in rows]).to(device)
                loss = loss + class_readout_loss(embeddings, color, shape, self.vocabulary, directions)
        return loss


def grounding_supervision(model, tokenizer, cfg: TrainConfig):
    """(AttentionSupervision or None, number token ids or None) for ferret.training.grounding's
    training-only losses; also starts the number rows as a smooth code when configured."""
    from ferret.tokenizer import number_token_ids
    from ferret.training.grounding import AttentionSupervision, init_coordinate_heads, init_number_rows

    t = cfg.train
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    number_ids = number_token_ids(tokenizer)
    coordinates = t.attention_supervision_coordinate_heads
    if (t.number_smoothing_weight > 0 or t.init_number_rows or coordinates or t.box_code_weight > 0) and number_ids is None:
        raise TrainConfigError("train.number_smoothing_weight / init_number_rows / attention_supervision_coordinate_heads / "
                               "box_code_weight: the tokenizer does not write each number 0-999 as one token "
                               "(build it with number tokens)")
    if t.init_number_rows:
        init_number_rows(base, number_ids, blocks=4 if coordinates else 1)
    supervision = None
    if t.attention_supervision_weight > 0:
        try:
            supervision = AttentionSupervision(model, tokenizer, t.attention_supervision_layer,
                                               t.attention_supervision_head, coordinate_heads=coordinates)
            if coordinates:
                init_coordinate_heads(base, t.attention_supervision_layer)
        except ValueError as err:
            raise TrainConfigError(f"train.attention_supervision_layer/head: {err}") from None
    return supervision, (torch.tensor(number_ids) if number_ids is not None else None)


def warm_up_region_masks(records, rng: np.random.Generator) -> list[torch.Tensor]:
    """One referred region per scene record for the warm-up: a random object's visible mask or,
    half the time, its whole box (as chat and the benchmarks refer), as a (W, H) bool mask."""
    from ferret.data.rle import decode_rle

    masks = []
    for record in records:
        obj = record["objects"][int(rng.integers(len(record["objects"])))]
        width, height = int(record["width"]), int(record["height"])
        mask = torch.zeros(width, height, dtype=torch.bool)
        if rng.random() < 0.5:
            mask[:] = torch.from_numpy(decode_rle(obj["mask"], (height, width)).T.copy())
        else:
            x1, y1, x2, y2 = (int(v) for v in obj["box"])
            mask[x1 : x2 + 1, y1 : y2 + 1] = True
        masks.append(mask)
    return masks


def warm_up_vision(model, readout: DenseReadout, patch_targets, image_processor, cfg: TrainConfig,
                   rank: int, world: int, device: torch.device) -> float:
    """Stage 1, for a tower trained from scratch: the vision tower, projector and region sampler
    alone, trained on the dense readout (no LLM forward): `train.vision_warmup_steps` steps of
    world x per_device_batch_size x vision_warmup_batch_multiple scenes drawn from the scene
    records, each step also one referred object (its visible mask or its box) in
    per_device_batch_size of them for the sampler. Plain AdamW in fp32 (bf16 autocast when the run
    is bf16), gradients averaged over the ranks, linear warm-up then cosine; every rank ends with
    the same weights. Returns the mean loss of the last tenth of the steps."""
    from ferret.dense_supervision import NameDirections, class_readout_loss, dense_readout_loss, region_object_targets
    from ferret.processing import preprocess_images

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    region_module = getattr(base.model, "region_geo_sampler", None)
    modules = [base.model.vision_tower, base.model.mm_projector] + ([region_module] if region_module is not None else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError("train.vision_warmup_steps: the vision tower, projector and region sampler are "
                               "all frozen; there is nothing to warm up")
    stored_dtype = params[0].dtype
    for module in modules:
        module.float()
    steps, t = cfg.train.vision_warmup_steps, cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.vision_warmup_learning_rate, weight_decay=0.0)
    per_rank = t.per_device_batch_size * t.vision_warmup_batch_multiple
    image_root = Path(resolve(cfg.data.scene_records)).parent
    scene_ids = sorted(patch_targets.records)
    directions = NameDirections.from_embeddings(readout.embeddings.weight, readout.name_ids)  # fixed: the LLM waits
    number_rows = None if readout.box_code is None else readout.lm_head.weight[readout.box_code[0]].detach().float()
    draw = torch.Generator().manual_seed(cfg.train.seed)  # same draw on every rank; each takes its slice
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")  # as the main loop
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        picks = torch.randint(len(scene_ids), (world * per_rank,), generator=draw)[rank * per_rank:(rank + 1) * per_rank]
        records = [patch_targets.records[scene_ids[i]] for i in picks.tolist()]
        pixels = preprocess_images([str(image_root / r["image"]) for r in records], image_processor).to(device)
        targets = [patch_targets[r["scene_id"]] for r in records]
        with autocast:
            features, tokens = base.encode_images(pixels)
        stacked = {k: torch.stack([x[k] for x in targets]).to(device) for k in ("patch_color", "patch_shape", "patch_box")}
        loss = dense_readout_loss(tokens.float(), stacked["patch_color"], stacked["patch_shape"], stacked["patch_box"],
                                  readout.vocabulary, directions)
        loss = loss + readout.box_code_term(tokens, stacked["patch_box"], stacked["patch_color"] > 0, number_rows)
        if region_module is not None:
            chosen = records[: t.per_device_batch_size]
            masks = warm_up_region_masks(chosen, np.random.default_rng([t.seed, step, rank]))
            with autocast:
                embeddings = base.encode_regions(features[: len(chosen)], [[m] for m in masks],
                                                 generator=torch.Generator().manual_seed(region_seed(t.seed, step, rank, 0)))
            classes = [region_object_targets(r, [m], readout.vocabulary) for r, m in zip(chosen, masks)]
            loss = loss + class_readout_loss(torch.cat(embeddings).float(),
                                             torch.cat([c["region_color"] for c in classes]).to(device),
                                             torch.cat([c["region_shape"] for c in classes]).to(device),
                                             readout.vocabulary, directions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]  # (the tower's unused layers have none)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, torch.split(flat / world, [g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        for group in optimizer.param_groups:
            group["lr"] = t.vision_warmup_learning_rate * lr_multiplier(step, min(30, steps // 10), steps, "cosine")
        optimizer.step()
        losses.append(loss.item())
        if rank == 0 and (step + 1) % 100 == 0:
            print(f"[ferret_train] vision warm-up {step + 1}/{steps} readout loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    for module in modules:
        module.to(stored_dtype)
    # first and last tenth's mean: a falling loss says the tower learned
    tenth = max(1, steps // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    if rank == 0:
        print(f"[ferret_train] vision warm-up done: {steps} steps, readout loss {first:.4f} -> {last:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return last


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded per-epoch permutation, skipping the first `start` of them.

    The order depends only on (seed, epoch, world size), so a resumed run sees exactly the
    samples the interrupted one would have seen next.
    """

    def __init__(self, length: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        order += order[: self.per_rank * self.world_size - self.length]  # pad so ranks get equal shares
        return order[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(cfg: TrainConfig, micro: int, accum: int, bf16: bool) -> dict:
    path = resolve(cfg.train.deepspeed)
    if not Path(path).is_file():
        raise TrainConfigError(f"train.deepspeed: DeepSpeed config {path} not found")
    with open(path) as handle:
        ds = json.load(handle)
    # The training config owns these; the json keeps only ZeRO/communication settings ("auto").
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds["bf16"] = {"enabled": bf16}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def region_seed(seed: int, step: int, rank: int, micro_step: int) -> int:
    return (((seed * 1_000_003 + step) * 10_007 + rank) * 101 + micro_step) % (2**63 - 1)


def move_batch(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    """Model inputs on the device; pixel values in the compute dtype, masks stay bool."""
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].long().to(device),
        "labels": batch["labels"].to(device),
        "region_masks": [[m.to(device) for m in masks] for masks in batch["region_masks"]],
    }
    if "pixel_values" in batch:
        inputs["images"] = batch["pixel_values"].to(device=device, dtype=float_dtype)
    return inputs


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """Rank 0: one json line per logged step (metrics.jsonl) plus TensorBoard scalars."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        # A resumed run rewrites history from its checkpoint on: drop the records after it.
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from ferret.data.errors import DataFormatError

    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        return train(cfg, args)
    except (TrainConfigError, CheckpointError, DataFormatError, FileNotFoundError) as err:
        # Problems with the inputs are the same on every rank: one line, no traceback.
        print(f"ferret_train: error: {err}", file=sys.stderr)
        return 2


def train(cfg: TrainConfig, args: argparse.Namespace) -> int:
    # ---- distributed setup: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (a plain `python` run is 1 process)
    import deepspeed

    on_gpu = torch.cuda.is_available()
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, default)
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    accum = cfg.accumulation_steps(world)
    micro = cfg.train.per_device_batch_size
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    torch.manual_seed(cfg.train.seed + rank)

    # ---- model, data
    model, tokenizer, image_processor = build_model(cfg, compute_dtype)
    model = prepare_trainable(model, cfg, rank)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    region_module = getattr(base.model, "region_geo_sampler", None)
    dataset = build_dataset(cfg, tokenizer, image_processor, model)
    readout = DenseReadout(model, tokenizer) if cfg.train.dense_loss_weight > 0 else None
    attention_supervision, number_ids = grounding_supervision(model, tokenizer, cfg)
    if readout is not None and cfg.train.box_code_weight > 0:
        readout.box_code = (number_ids, cfg.train.box_code_weight, cfg.train.box_code_sigma)
    from ferret.data.collate import FerretCollator
    from ferret.processing import FerretProcessor

    sampler = ResumableDistributedSampler(len(dataset), rank, world, cfg.train.seed, cfg.train.shuffle)
    steps_per_epoch = sampler.per_rank // (micro * accum)
    if steps_per_epoch == 0:
        raise TrainConfigError(
            f"train.per_device_batch_size: {len(dataset)} samples over {world} ranks cannot fill one step "
            f"of {micro} x {accum} micro-batches"
        )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.floor(cfg.train.num_train_epochs * steps_per_epoch)
    warmup = cfg.train.warmup_steps or math.ceil(cfg.train.warmup_ratio * total_steps)

    # ---- optimizer, schedule, engine
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg.train.weight_decay), lr=cfg.train.learning_rate,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup, total_steps, cfg.train.lr_scheduler)
    )
    ds_config = deepspeed_config(cfg, micro, accum, bf16)
    if on_gpu and ds_config.get("zero_optimization", {}).get("stage") == 3 and region_module is not None:
        # The region sampler reads its sub-modules' weights directly (folded kernels), so ZeRO-3
        # must gather the whole module at once instead of hooking each child. (Not on CPU:
        # DeepSpeed 0.19's leaf path calls record_stream on CPU gradients and fails; the small
        # CPU models keep every sampler weight below the persistence threshold anyway.)
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [type(region_module)])
    # ---- stage 1: the vision side alone on the dense readout (skipped when resuming: its result
    # is in the checkpoint)
    resume_folder = None
    if args.resume is not None:
        resume_folder = read_latest(ckpt_root) if args.resume == "latest" else Path(args.resume)
    if cfg.train.vision_warmup_steps > 0 and resume_folder is None:
        warm_up_vision(model, readout, dataset.patch_targets, image_processor, cfg, rank, world, device)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config,
    )

    # ---- resume
    state = TrainerState(world_size=world, micro_batch_size=micro, accumulation_steps=accum)
    if args.resume is not None:
        folder = resume_folder
        if folder is None:
            if rank == 0:
                print(f"[ferret_train] --resume: no checkpoint in {ckpt_root} yet, starting from step 0")
        else:
            state = load_deepspeed_checkpoint(engine, folder, rank, world)
            if (state.micro_batch_size, state.accumulation_steps) != (micro, accum):
                raise CheckpointError(
                    f"{folder} used micro-batch {state.micro_batch_size} x accumulation {state.accumulation_steps}, "
                    f"this run {micro} x {accum}: the data order would differ"
                )
            if rank == 0:
                print(f"[ferret_train] resumed from {folder} at step {state.global_step} (epoch {state.epoch})")
    metrics = MetricsLog(out_dir, state.global_step, cfg.train.tensorboard) if rank == 0 else None
    crash_at = int(os.environ.get("FERRET_TRAIN_CRASH_AT_STEP", "0") or 0)

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=state.global_step, disable=rank != 0, desc="train",
                    dynamic_ncols=True, file=sys.stdout)
    if rank == 0:
        print(f"[ferret_train] {world} ranks x micro-batch {micro} x accumulation {accum} = global batch "
              f"{world * micro * accum}; {steps_per_epoch} steps/epoch, {total_steps} steps, warmup {warmup}, "
              f"{'bf16' if bf16 else 'fp32'} on {device.type}, ZeRO-{engine.zero_optimization_stage()}")

    # ---- the loop
    engine.train()
    run_start = time.perf_counter()
    run_samples = run_tokens = 0
    last_loss = float("nan")
    last_saved = state.global_step if args.resume else -1
    loader_kwargs = dict(batch_size=micro, sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers,
                         collate_fn=FerretCollator(tokenizer.pad_token_id, cfg.data.model_max_length,
                                                    cfg.data.pad_to_multiple_of))
    while state.global_step < total_steps:
        sampler.set_epoch(state.epoch, start=state.step_in_epoch * micro * accum)
        dataset.set_epoch(state.epoch)
        batches = iter(torch.utils.data.DataLoader(dataset, **loader_kwargs))
        while state.global_step < total_steps:
            step_start = time.perf_counter()
            losses, dense_losses, samples, tokens = [], [], 0, 0
            attention_losses, attention_masses = [], []
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            for micro_step in range(accum):
                batch = next(batches)
                # Region points come from a generator seeded by (seed, step, rank, micro-step): the
                # same draw whether or not the run was interrupted.
                generator = torch.Generator(device=device).manual_seed(
                    region_seed(cfg.train.seed, state.global_step, rank, micro_step)
                )
                inputs = move_batch(batch, device, compute_dtype)
                outputs = engine(**inputs, region_generator=generator)
                loss = outputs.loss
                if readout is not None:
                    # Every rank runs the same graph whether or not this batch has targets.
                    dense = readout.loss(batch, device) if "patch_color" in batch else loss.new_zeros(())
                    loss = loss + cfg.train.dense_loss_weight * dense
                    dense_losses.append(dense.detach().float())
                if attention_supervision is not None:
                    attend = attention_supervision.loss(batch) if "answer_cells" in batch else loss.new_zeros(())
                    loss = loss + cfg.train.attention_supervision_weight * attend
                    attention_losses.append(attend.detach().float())
                    attention_masses.append(attention_supervision.last_mass)
                if number_ids is not None and cfg.train.number_smoothing_weight > 0:
                    from ferret.training.grounding import number_smoothing_loss, spliced_labels

                    labels = spliced_labels(batch["input_ids"], batch["labels"], base.get_vision_tower().num_patches,
                                            outputs.logits.shape[1]).to(device)
                    smooth = number_smoothing_loss(outputs.logits, labels, number_ids, cfg.train.number_smoothing_sigma)
                    loss = loss + cfg.train.number_smoothing_weight * smooth
                engine.backward(loss)
                engine.step()
                losses.append(outputs.loss.detach().float())
                samples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
            # Loss averaged over micro-batches and ranks; samples and tokens summed over ranks.
            # (tokens = text tokens from the attention mask; the image's patch embeddings not counted)
            dense_mean = torch.stack(dense_losses).mean() if dense_losses else torch.zeros(())
            stats = torch.stack([torch.stack(losses).mean().to(device),
                                 torch.tensor(float(samples), device=device), torch.tensor(float(tokens), device=device),
                                 dense_mean.to(device)])
            dist.all_reduce(stats)
            loss, step_samples, step_tokens = stats[0].item() / world, int(stats[1].item()), int(stats[2].item())
            dense_loss = stats[3].item() / world
            state.global_step += 1
            state.step_in_epoch += 1
            state.samples_seen += step_samples
            state.tokens_seen += step_tokens
            run_samples += step_samples
            run_tokens += step_tokens
            last_loss = loss
            elapsed = time.perf_counter() - step_start
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if rank == 0 and (state.global_step % cfg.train.logging_steps == 0 or state.global_step == total_steps):
                record = {
                    "step": state.global_step,
                    "epoch": state.epoch + state.step_in_epoch / steps_per_epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "samples_per_s": step_samples / elapsed,
                    "tokens_per_s": step_tokens / elapsed,
                }
                if readout is not None:
                    record["dense_loss"] = dense_loss
                if attention_supervision is not None:
                    # (rank 0's micro-batches: a monitor of how far the head looks at the object)
                    record["attention_loss"] = torch.stack(attention_losses).mean().item()
                    record["attention_mass"] = float(np.nanmean(attention_masses))
                metrics.log(record)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
                progress.write(
                    f"step {state.global_step}/{total_steps} loss {loss:.4f} lr {record['lr']:.3e} "
                    f"grad_norm {grad_norm:.3f} samples/s {record['samples_per_s']:.2f} "
                    f"tokens/s {record['tokens_per_s']:.1f}"
                    + (f" dense_loss {dense_loss:.4f}" if readout is not None else "")
                    + (f" attention_mass {record['attention_mass']:.3f}" if attention_supervision is not None else "")
                )
            progress.update(1)
            epoch_done = state.step_in_epoch == steps_per_epoch
            if epoch_done:  # a checkpoint taken now says "next epoch, from its start"
                state.epoch += 1
                state.step_in_epoch = 0
            if cfg.train.save_steps and state.global_step % cfg.train.save_steps == 0:
                save_deepspeed_checkpoint(engine, ckpt_root, state, rank)
                last_saved = state.global_step
                if rank == 0:
                    prune_checkpoints(ckpt_root, cfg.train.save_total_limit)
            if crash_at and state.global_step == crash_at and rank == 0:
                sys.stdout.flush()
                os._exit(13)  # test hook: a hard crash, no cleanup, no final save
            if epoch_done:
                break
    progress.close()

    # ---- final checkpoint, export, summary
    if last_saved != state.global_step:
        save_deepspeed_checkpoint(engine, ckpt_root, state, rank)
        if rank == 0:
            prune_checkpoints(ckpt_root, cfg.train.save_total_limit)
    export_dir = None
    if cfg.train.export_hf:
        full_state = consolidated_state_dict(engine)  # collective under ZeRO-3
        if rank == 0:
            plain = engine.module
            if cfg.lora.enable:
                full_state = merge_lora_state_dict(full_state, scaling=cfg.lora.alpha / cfg.lora.r)
                plain = engine.module.get_base_model()
            export_dir = export_hf_folder(plain, full_state, out_dir / "hf", tokenizer, FerretProcessor(tokenizer, image_processor))
        dist.barrier()
    total_time = time.perf_counter() - run_start
    if rank == 0:
        summary = {
            "steps": state.global_step,
            "seconds": round(total_time, 2),
            "samples_per_s": run_samples / total_time if total_time else 0.0,
            "tokens_per_s": run_tokens / total_time if total_time else 0.0,
            "final_loss": last_loss,
            "checkpoint": str(read_latest(ckpt_root)),
            "export": str(export_dir) if export_dir else None,
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[ferret_train] done: {summary['steps']} steps in {summary['seconds']:.1f} s, "
              f"{summary['samples_per_s']:.2f} samples/s, {summary['tokens_per_s']:.1f} tokens/s, "
              f"final loss {last_loss:.4f}, checkpoint {summary['checkpoint']}, export {summary['export']}")
        metrics.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
