"""Typed training configuration: plain data (yaml or json) -> validated dataclasses.

A config file has four sections, `model`, `data`, `lora` and `train`; command-line overrides
use dotted keys (`train.learning_rate=1e-4`). An optional list `stages` chains later stages into
the same launch: each is the stage before plus its own dotted overrides, started from the model
that stage exported, or a soup of variants averaged into one model (`TrainConfig.launch_steps`). Every problem (unknown key, wrong type, bad
value, inconsistent combination) raises `TrainConfigError` whose message names the key in one
line, so `train/ferret_train.py` can print it and exit instead of failing deep inside DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

__all__ = [
    "TrainConfigError",
    "ModelSection",
    "DataSection",
    "LoraSection",
    "TrainSection",
    "StageSection",
    "WeightAverage",
    "TrainConfig",
    "load_train_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "resolve_path",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


class TrainConfigError(ValueError):
    """A training config key is unknown, ill-typed or inconsistent; the message names the key."""


@dataclass
class ModelSection:
    # Exactly one source: `pretrained` (a Ferret folder that load_pretrained reads), `base_llm`
    # (assemble a new Ferret as the released run starts: a LLaMA/Vicuna folder + `vision_tower`, a
    # CLIP folder, + optionally `mm_projector`, LLaVA's pretrained projector .bin; the region
    # sampler starts random), or `tiny` (a random tiny Ferret from ferret.model.tiny).
    pretrained: str | None = None
    base_llm: str | None = None
    vision_tower: str | None = None
    mm_projector: str | None = None
    # for base_llm: "official" reads CLIP features at the transposed point, as the released weights
    # were trained; "aligned" (new models) at the true point
    feature_layout: Literal["official", "aligned"] = "aligned"
    tiny: bool = False
    tokenizer: str | None = None  # tokenizer folder for the tiny model (default: trained in-process)
    init_seed: int = 0  # weight init of the tiny model (same on every rank)
    tiny_overrides: dict = field(default_factory=dict)  # extra FerretConfig fields for the tiny model
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = True  # the released recipe never trains CLIP
    # A torch file with the tower's state dict (under "tower", as bench/probes/tower_probe.py --save
    # writes it) to start the vision tower from, e.g. to probe the LLM stage on a trained tower.
    vision_tower_weights: str | None = None


@dataclass
class DataSection:
    data_path: list[str] = field(default_factory=list)  # GRIT json files
    image_folder: list[str] = field(default_factory=list)  # one per data_path (empty: each json's folder)
    data_multiple: list[float] | None = None  # per-file mixing multiplier (None: plain concat)
    model_max_length: int = 2048
    point_input_sample: str = "segment_mask|center"
    num_workers: int = 0
    # Scene records (the synthetic world's scenes_train.json) for the dense readout loss.
    scene_records: str | None = None
    # Pad each batch to a multiple of this many tokens (1: to its longest sample). On CPU, bf16
    # matmuls build a oneDNN kernel per shape; few shapes keep that cache small.
    pad_to_multiple_of: int = 1
    # Batch samples of similar length (ferret.training.seeding.ResumableDistributedSampler): fewer
    # padded tokens, the same samples per epoch. The vision warm-up draws its own scenes.
    group_by_length: bool = False


@dataclass
class LoraSection:
    enable: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05


@dataclass
class TrainSection:
    output_dir: str = "checkpoints/run"
    deepspeed: str = "train/configs/ds_zero2.json"  # relative paths resolve against the repo root
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_batch_size: int = 16
    # Either a global batch (accumulation derived from the world size) or a fixed accumulation.
    global_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    # None: the answer loss is the mean over a micro-batch's answer tokens. A number: their sum over
    # this constant (a micro-batch's mean answer tokens in a shuffled order), so a token weighs the
    # same in every batch; length-grouped batches otherwise give the long samples' tokens (grounded
    # captions) 0.78x their weight in a shuffled order (bench/probes/token_weight.py).
    lm_loss_tokens: float | None = None
    # auto: bf16 on GPU, fp32 on CPU. bf16: bf16 weights and activations (fp32 master weights in the
    # optimizer). bf16-mixed: fp32 weights and residual stream, matmuls in bf16 (autocast).
    precision: Literal["auto", "bf16", "bf16-mixed", "fp32"] = "auto"
    seed: int = 42
    save_steps: int = 1500  # 0: only the final checkpoint
    save_total_limit: int = 3  # checkpoints kept (0: keep all)
    logging_steps: int = 1
    tensorboard: bool = True
    export_hf: bool = True  # write a Hugging Face folder (output_dir/hf) at the end
    shuffle: bool = True
    # > 0: add this times ferret.training.dense_supervision's readout loss on the image tokens (towers
    # trained from scratch; needs data.scene_records).
    dense_loss_weight: float = 0.0
    # > 0: before the main loop, train the vision tower, projector and region sampler alone on that
    # readout for this many steps (per-rank batch per_device_batch_size x vision_warmup_batch_multiple).
    # A tower trained from scratch learns shapes from the readout in a few thousand cheap steps,
    # which the LLM's slow steps cannot afford.
    vision_warmup_steps: int = 0
    vision_warmup_batch_multiple: int = 1
    vision_warmup_learning_rate: float = 1e-3
    # > 0: add this times ferret.training.grounding's attention supervision (one head of one decoder
    # layer pushed, from the answer's box positions, onto the image cells of the box's object;
    # needs data.scene_records).
    attention_supervision_weight: float = 0.0
    attention_supervision_layer: int = -2
    attention_supervision_head: int = 0
    # Heads 0-3 of that layer each own one box coordinate (ferret.training.grounding's coordinate
    # heads; needs number or digit tokens, head_dim x 4 == hidden_size); with box_code_weight > 0 the image
    # tokens learn to hold their object's box in the 4 coordinate blocks, read by the number rows.
    attention_supervision_coordinate_heads: bool = False
    # The head pushed, from the position that writes "Yes"/"No", onto the asked object or BOS:
    # by default the one above (layer, head); another layer's head keeps presence off the
    # coordinate heads, and is also pushed onto each box's object from the box positions.
    presence_supervision_layer: int | None = None
    presence_supervision_head: int | None = None
    # Each "Yes"/"No" query's loss on that head counts this many times a box query's.
    presence_supervision_weight: float = 1.0
    # Where that head is pushed for an absent name: "bos" (the attention sink) or "self" (the
    # answer position itself).
    presence_absent_target: Literal["bos", "self"] = "bos"
    # A head of an earlier layer pushed, from that same position, onto the question's colour and
    # shape words, so the presence head's query knows what is asked (off when the layer is None).
    name_supervision_layer: int | None = None
    name_supervision_head: int = 0
    # Push that head onto each word on its own (half its attention on the colour, half on the
    # shape) instead of onto the two together, which full_coordpe_v2n's met with the shape word alone.
    name_supervision_each_word: bool = False
    # Also push that head, from each answer position that writes a word of the asked name ("The
    # pink cross [...]", "Yes, the pink cross [...]"), onto the same word in the turn's question:
    # runs whose box heads bound late restated one of the two words wrong in a third of their
    # answers at step 700, the run that bound on time in 0.03 (session 24).
    name_supervision_copy: bool = False
    # The copy supervision for this stage's first N LLM steps only (None: every step). Both copy
    # runs bound on time but named 0.02-0.06 worse at the end than their controls (session 26).
    name_supervision_copy_steps: int | None = None
    # Also push that head, from the positions that write a box's numbers, onto each of the box's own
    # colour and shape words (the two before its "["): a second draw's x1 coordinate head matched
    # the shape alone, as no head of its layers 0-1 read the colour at the "[" that writes x1
    # (`coordinate_attention_probe.py`'s name_reads; the shipped model's layer 1 head 2 does, session 30).
    # On that draw it fixed x1 (grounding 0.845 -> 0.952) but cost "No" (0.963 -> 0.835) and the
    # two-way choice (LVIS 0.93 -> 0.73): off in embedded.yaml (card, boxnames_s7).
    name_supervision_boxes: bool = False
    # The head those box name reads are pushed on, when not the name head (the shipped draw's layer 1
    # head 2 reads x1's colour unasked). On layer 1 head 2 the seed-7 draw lost more of "No" (0.730)
    # than on the name head: the cost is the push's, not the head's (card, boxhead_s7).
    name_supervision_boxes_layer: int | None = None
    name_supervision_boxes_head: int = 0
    # The box name reads for this stage's first N LLM steps only (None: every step), as the copy
    # supervision (name_supervision_copy_steps): kept on to the end, the push cost "No" in one draw
    # and naming in the other (boxcolour_s7 / boxcolour_s42, session 32) while the coordinate heads
    # had bound by step ~600 (mass 0.97).
    name_supervision_boxes_steps: int | None = None
    # Another head of the name head's layer pushed, from the "Yes"/"No" position, onto the asked colour
    # word alone: the two draws that kept the conjunction ("No" 0.963) had layer 0 head 3 doing so
    # unasked, both box-name runs lost it and "No" with it (0.835 / 0.730; session 31).
    name_supervision_colour_head: int | None = None
    # > 0: add this times ferret.training.grounding.BoxNameReadout's loss (each answer box's colour
    # and shape read from the input of the box heads' layer, attention_supervision_layer, at the
    # positions that write its numbers): the name there without choosing the head that brings it.
    box_name_readout_weight: float = 0.0
    # > 0: add this times ferret.training.grounding.AnswerNameReadout's loss: the same readout at the
    # two positions that write each colour-and-shape name of the answers.
    answer_name_readout_weight: float = 0.0
    box_code_weight: float = 0.0
    box_code_sigma: float = 6.0
    # > 0 (with box_code_weight > 0): the same box code, at this weight, on each referred region's
    # embedding for the object it overlaps most (LLM stage). Why: a referring answer finds its object
    # among the image tokens by colour, and an object with a colour twin is named wrong twice as
    # often; the region embedding said what its object is, never where (session 44).
    region_box_code_weight: float = 0.0
    # Heads of attention_supervision_layer (the coordinate heads' layer) pushed, from each answer
    # position that writes a name word of a turn about one region ("What is the object <region>?" ->
    # "A pink ring."), onto that region's object. Why: at the shape word, layer 2's heads 1-2 looked
    # at the colour twin in 0.56-0.59 of the wrong names (session 44). Session 37 pushed heads of
    # layers 1 and 3 (not the ones that read the object) and named no better.
    region_name_supervision_heads: list[int] = field(default_factory=list)
    # > 0 (needs a tokenizer with one token per number 0-999): add this times a cross-entropy
    # against a Gaussian of std number_smoothing_sigma grid units around each number label.
    number_smoothing_weight: float = 0.0
    number_smoothing_sigma: float = 4.0
    # Start the number tokens' embedding rows as a smooth code of their value (number tokenizers).
    init_number_rows: bool = False


@dataclass
class StageSection:
    """A later stage of the same launch: the stage before it plus `overrides` ({"section.key":
    value}), started from the model that stage exported, written to <output_dir>/<name>.

    Its export may instead be a weight average ("model soup": fine-tunes of one model average
    within one basin). With `soup` (a list of two or more override dicts) the stage trains one
    variant per entry, each from the same start with its own overrides on top of the stage's; with
    `start_weight` > 0 the model the stage started from joins the average with that weight (the
    variants weigh 1 each; start_weight 1 and no soup: the midpoint of the start and its fine-tune,
    WiSE-FT). The trained variants live in <output_dir>/<name>/<name>-<i>, the average is
    <output_dir>/<name>/hf."""

    name: str
    overrides: dict = field(default_factory=dict)
    soup: list[dict] = field(default_factory=list)
    start_weight: float = 0.0


@dataclass(frozen=True)
class WeightAverage:
    """The last step of an averaged stage: the weighted average of `sources` ((hf folder, weight)
    pairs) into <out_dir>/hf."""

    sources: tuple[tuple[str, float], ...]
    out_dir: str


_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RUN_FOLDERS = ("hf", "checkpoints", "tensorboard")  # what a run writes in its output_dir


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    stages: list[StageSection] = field(default_factory=list)

    def stage_configs(self) -> list["TrainConfig"]:
        """Every run the launch trains, in order (see `launch_steps`)."""
        return [step for step in self.launch_steps() if isinstance(step, TrainConfig)]

    def launch_steps(self) -> list["TrainConfig | WeightAverage"]:
        """The launch in order: this config (its config.json keeps `stages`, so it replays the whole
        launch), then per stage one config (the one before + the stage's overrides, from that one's
        export), or for a soup stage one config per variant and the average of their exports; each
        validated."""
        steps: list[TrainConfig | WeightAverage] = [self]
        before, start = self, Path(self.train.output_dir) / "hf"
        names = set()
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}] ({stage.name})"
            if not _STAGE_NAME.fullmatch(stage.name) or stage.name in _RUN_FOLDERS or stage.name in names:
                raise TrainConfigError(f"{where}: a stage needs its own folder name (letters, digits, _ . -; "
                                       f"unique; not {', '.join(_RUN_FOLDERS)})")
            names.add(stage.name)
            if not before.train.export_hf:
                raise TrainConfigError(f"{where}: the stage before it must export its model (train.export_hf: true)")
            if len(stage.soup) == 1:
                raise TrainConfigError(f"{where}: soup: a soup needs two variants or more (or none)")
            if not 0 <= stage.start_weight < float("inf"):
                raise TrainConfigError(f"{where}: start_weight: {stage.start_weight!r} is not a weight >= 0")
            folder = Path(self.train.output_dir) / stage.name
            # What the stage sets itself: its model is the one the stage before exported, its folder its name.
            own = {"model.pretrained": str(start), "model.base_llm": None,
                   "model.tiny": False, "model.vision_tower": None, "model.mm_projector": None,
                   "model.vision_tower_weights": None, "train.output_dir": str(folder)}
            data = {**config_to_dict(before), "stages": []}
            try:
                stage_config = _with_overrides(data, stage.overrides, own)
                averaged = stage.soup or ([{}] if stage.start_weight else [])
                variants = [_with_overrides(data, {**stage.overrides, **extra},
                                            {**own, "train.output_dir": str(folder / f"{stage.name}-{k}")}, f"soup[{k}]: ")
                            for k, extra in enumerate(averaged)]
            except TrainConfigError as err:
                raise TrainConfigError(f"{where}: {err}") from None
            if variants:
                steps += variants
                sources = [(str(start), float(stage.start_weight))] if stage.start_weight else []
                sources += [(str(Path(v.train.output_dir) / "hf"), 1.0) for v in variants]
                steps.append(WeightAverage(tuple(sources), str(folder)))
            else:
                steps.append(stage_config)
            before, start = stage_config, folder / "hf"
        return steps

    def validate(self) -> None:
        m, d, lo, t = self.model, self.data, self.lora, self.train
        if sum((bool(m.pretrained), bool(m.base_llm), bool(m.tiny))) != 1:
            raise TrainConfigError("model.pretrained / model.base_llm / model.tiny: set exactly one model source")
        if bool(m.base_llm) != bool(m.vision_tower):
            raise TrainConfigError("model.vision_tower: a CLIP folder is needed with model.base_llm (and only then)")
        if m.mm_projector and not m.base_llm:
            raise TrainConfigError("model.mm_projector: only used with model.base_llm")
        if not d.data_path:
            raise TrainConfigError("data.data_path: at least one GRIT json file is required")
        if d.group_by_length and not t.shuffle:
            raise TrainConfigError("data.group_by_length: groups a shuffled order; with train.shuffle false "
                                   "there is none to group")
        if d.image_folder and len(d.image_folder) != len(d.data_path):
            raise TrainConfigError(
                f"data.image_folder: {len(d.image_folder)} folders for {len(d.data_path)} data_path files"
            )
        if d.data_multiple is not None:
            if len(d.data_multiple) != len(d.data_path):
                raise TrainConfigError(
                    f"data.data_multiple: {len(d.data_multiple)} values for {len(d.data_path)} data_path files"
                )
            if any(v < 0 for v in d.data_multiple):
                raise TrainConfigError("data.data_multiple: multipliers must be >= 0")
        _positive("data.model_max_length", d.model_max_length)
        _non_negative("data.num_workers", d.num_workers)
        _positive("data.pad_to_multiple_of", d.pad_to_multiple_of)
        _positive("lora.r", lo.r)
        _positive("lora.alpha", lo.alpha)
        if not 0.0 <= lo.dropout < 1.0:
            raise TrainConfigError(f"lora.dropout: {lo.dropout} is not in [0, 1)")
        _positive("train.per_device_batch_size", t.per_device_batch_size)
        _positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
        if t.global_batch_size is not None:
            _positive("train.global_batch_size", t.global_batch_size)
        if t.max_steps <= 0 and t.num_train_epochs <= 0:
            raise TrainConfigError("train.num_train_epochs: must be > 0 (or set train.max_steps)")
        _positive("train.learning_rate", t.learning_rate)
        _non_negative("train.weight_decay", t.weight_decay)
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise TrainConfigError(f"train.warmup_ratio: {t.warmup_ratio} is not in [0, 1)")
        _non_negative("train.warmup_steps", t.warmup_steps)
        _non_negative("train.max_grad_norm", t.max_grad_norm)
        _non_negative("train.save_steps", t.save_steps)
        _non_negative("train.save_total_limit", t.save_total_limit)
        _positive("train.logging_steps", t.logging_steps)
        _non_negative("train.dense_loss_weight", t.dense_loss_weight)
        if t.dense_loss_weight > 0 and not d.scene_records:
            raise TrainConfigError("data.scene_records: train.dense_loss_weight > 0 needs the scene records "
                                   "(scenes_train.json) its targets come from")
        _non_negative("train.vision_warmup_steps", t.vision_warmup_steps)
        _positive("train.vision_warmup_batch_multiple", t.vision_warmup_batch_multiple)
        _positive("train.vision_warmup_learning_rate", t.vision_warmup_learning_rate)
        if t.vision_warmup_steps > 0 and t.dense_loss_weight <= 0:
            raise TrainConfigError("train.vision_warmup_steps: the warm-up trains on the dense readout; "
                                   "set train.dense_loss_weight > 0 (and data.scene_records)")
        _non_negative("train.attention_supervision_weight", t.attention_supervision_weight)
        if t.attention_supervision_weight > 0 and not d.scene_records:
            raise TrainConfigError("data.scene_records: train.attention_supervision_weight > 0 needs the scene "
                                   "records (scenes_train.json) its targets come from")
        _non_negative("train.presence_supervision_weight", t.presence_supervision_weight)
        if t.name_supervision_copy and t.name_supervision_layer is None:
            raise TrainConfigError("train.name_supervision_copy: the copy is supervised on the name head; "
                                   "set train.name_supervision_layer (and _head)")
        if t.lm_loss_tokens is not None:
            _positive("train.lm_loss_tokens", t.lm_loss_tokens)
        if t.name_supervision_boxes and t.name_supervision_layer is None and t.name_supervision_boxes_layer is None:
            raise TrainConfigError("train.name_supervision_boxes: the box name reads are supervised on the name "
                                   "head; set train.name_supervision_layer (and _head) or "
                                   "train.name_supervision_boxes_layer (and _head)")
        if t.name_supervision_boxes_layer is not None and not t.name_supervision_boxes:
            raise TrainConfigError("train.name_supervision_boxes_layer: the head of the box name reads, which are "
                                   "off; set train.name_supervision_boxes=true or leave the layer unset")
        if t.name_supervision_boxes_steps is not None:
            _positive("train.name_supervision_boxes_steps", t.name_supervision_boxes_steps)
            if not t.name_supervision_boxes:
                raise TrainConfigError("train.name_supervision_boxes_steps: limits the box name reads, which are "
                                       "off; set train.name_supervision_boxes=true or leave the steps unset")
        if t.name_supervision_colour_head is not None:
            if t.name_supervision_layer is None:
                raise TrainConfigError("train.name_supervision_colour_head: a head of the name head's layer; "
                                       "set train.name_supervision_layer (and _head)")
            if t.name_supervision_colour_head == t.name_supervision_head:
                raise TrainConfigError("train.name_supervision_colour_head: the name head itself "
                                       f"({t.name_supervision_head}); pick another head of its layer")
        if t.name_supervision_copy_steps is not None:
            _positive("train.name_supervision_copy_steps", t.name_supervision_copy_steps)
            if not t.name_supervision_copy:
                raise TrainConfigError("train.name_supervision_copy_steps: limits the copy supervision, which is "
                                       "off; set train.name_supervision_copy=true or leave the steps unset")
        for key in ("box_name_readout_weight", "answer_name_readout_weight"):
            _non_negative(f"train.{key}", getattr(t, key))
            if getattr(t, key) > 0 and not d.scene_records:
                raise TrainConfigError(f"data.scene_records: train.{key} > 0 reads the answers of batches "
                                       "with scene targets; set data.scene_records")
        _non_negative("train.box_code_weight", t.box_code_weight)
        _positive("train.box_code_sigma", t.box_code_sigma)
        _non_negative("train.region_box_code_weight", t.region_box_code_weight)
        if t.region_name_supervision_heads and t.attention_supervision_weight <= 0:
            raise TrainConfigError("train.region_name_supervision_heads: their loss is weighted by "
                                   "train.attention_supervision_weight; set it > 0")
        if t.region_box_code_weight > 0 and t.box_code_weight <= 0:
            raise TrainConfigError("train.region_box_code_weight: the region's box code is read by the image tokens' "
                                   "number rows; set train.box_code_weight > 0")
        if t.box_code_weight > 0 and t.dense_loss_weight <= 0:
            raise TrainConfigError("train.box_code_weight: the box code is part of the dense readout; set "
                                   "train.dense_loss_weight > 0 (and data.scene_records)")
        _non_negative("train.number_smoothing_weight", t.number_smoothing_weight)
        _positive("train.number_smoothing_sigma", t.number_smoothing_sigma)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                raise TrainConfigError(f"train.{name}: {getattr(t, name)} is not in [0, 1)")
        if self.stages:
            self.stage_configs()

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank (from global_batch_size when it is set)."""
        t = self.train
        if t.global_batch_size is None:
            return t.gradient_accumulation_steps
        per_step = t.per_device_batch_size * world_size
        if t.global_batch_size % per_step:
            raise TrainConfigError(
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                f"per_device_batch_size {t.per_device_batch_size} x world size {world_size}"
            )
        return t.global_batch_size // per_step


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise TrainConfigError(f"{key}: must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise TrainConfigError(f"{key}: must be >= 0, got {value}")


# --------------------------------------------------------------------------- typed conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """`value` converted to the annotated type `tp`, or TrainConfigError naming `key`.

    Text from the command line is parsed by type; file values must already have the type,
    except that numeric text is accepted for floats (yaml reads `2e-5` as a string).
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or (from_text and str(value).lower() in ("none", "null"))):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option, from_text)
            except TrainConfigError as exc:
                errors.append(str(exc))
        raise TrainConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise TrainConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise TrainConfigError(f"{key}: {value!r} is not a json list ({exc.msg})") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp, from_text) for i, v in enumerate(value)]
    if tp is dict:
        if from_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise TrainConfigError(f"{key}: {value!r} is not a json object ({exc.msg})") from None
        if not isinstance(value, dict):
            raise TrainConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TrainConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise TrainConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise TrainConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_SECTIONS = {name: tp for name, tp in _section_types(TrainConfig).items() if name != "stages"}


def _known_key(key: str) -> tuple[str, str]:
    """('section', 'key') of a dotted key, or TrainConfigError naming what is unknown."""
    section, sep, name = key.partition(".")
    if not sep:
        raise TrainConfigError(f"{key}: a key must look like section.key")
    if section not in _SECTIONS:
        raise TrainConfigError(f"{key}: unknown config section (known: {', '.join(_SECTIONS)})")
    types_ = _section_types(_SECTIONS[section])
    if name not in types_:
        raise TrainConfigError(f"{key}: unknown config key (known in {section}: {', '.join(types_)})")
    return section, name


def _with_overrides(data: dict, overrides: dict, own: dict, where: str = "") -> TrainConfig:
    """A stage's config: `data` (plain config data) with the stage's dotted overrides and the keys the
    stage sets itself (`own`, which the overrides may not name)."""
    clash = sorted(own.keys() & overrides.keys())
    if clash:
        raise TrainConfigError(f"{where}{', '.join(clash)}: set by the stage itself (the model the stage "
                               f"before exported, its own folder)")
    data = {section: dict(value) if isinstance(value, dict) else value for section, value in data.items()}
    try:
        for key, value in {**overrides, **own}.items():
            section, name = _known_key(key)
            data[section][name] = value
        return config_from_dict(data)
    except TrainConfigError as err:
        raise TrainConfigError(f"{where}{err}") from None


def _stages_from_data(stages: Any) -> list[StageSection]:
    if not isinstance(stages, list):
        raise TrainConfigError(f"stages: expected a list of {{name, overrides}}, got {type(stages).__name__}")
    parsed = []
    for i, stage in enumerate(stages):
        soup = stage.get("soup") or [] if isinstance(stage, dict) else None
        weight = stage.get("start_weight", 0.0) if isinstance(stage, dict) else None
        if (not isinstance(stage, dict) or set(stage) - {"name", "overrides", "soup", "start_weight"}
                or not isinstance(stage.get("name"), str) or not isinstance(stage.get("overrides") or {}, dict)
                or not isinstance(soup, list) or not all(isinstance(v, dict) for v in soup)
                or isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise TrainConfigError(f"stages[{i}]: expected {{name: str, overrides: {{section.key: value}}, optional "
                                   f"soup: [{{section.key: value}}, ...], optional start_weight: number}}, got {stage!r}")
        parsed.append(StageSection(stage["name"], dict(stage.get("overrides") or {}), [dict(v) for v in soup],
                                   float(weight)))
    return parsed


def config_from_dict(data: dict, *, validate: bool = True) -> TrainConfig:
    """A TrainConfig from nested plain data ({'model': {...}, 'train': {...}}), type-checked."""
    if not isinstance(data, dict):
        raise TrainConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    sections = {}
    for name, value in data.items():
        if name == "stages":
            sections[name] = _stages_from_data(value or [])
            continue
        if name not in _SECTIONS:
            raise TrainConfigError(f"{name}: unknown config section (known: {', '.join(_SECTIONS)})")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise TrainConfigError(f"{name}: expected a mapping of keys, got {type(value).__name__}")
        cls = _SECTIONS[name]
        types_ = _section_types(cls)
        kwargs = {}
        for key, item in value.items():
            if key not in types_:
                raise TrainConfigError(f"{name}.{key}: unknown config key (known in {name}: {', '.join(types_)})")
            kwargs[key] = _coerce(f"{name}.{key}", item, types_[key], from_text=False)
        sections[name] = cls(**kwargs)
    config = TrainConfig(**sections)
    if validate:
        config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(config: TrainConfig, overrides: list[str], *, validate: bool = True) -> TrainConfig:
    """Apply `section.key=value` strings (values parsed by the key's type) to a copy of `config`."""
    data = config_to_dict(config)
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip().lstrip("-")
        if not sep or "." not in key:
            raise TrainConfigError(f"{text}: an override must look like section.key=value")
        section, name = _known_key(key)
        data[section][name] = _coerce(key, raw, _section_types(_SECTIONS[section])[name], from_text=True)
    return config_from_dict(data, validate=validate)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a yaml/json config file, apply overrides, validate. Relative data paths stay as written."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: report the file, one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrainConfigError(f"{path}: cannot parse config ({first})") from None
    config = config_from_dict(data or {}, validate=False)
    config = apply_overrides(config, overrides or [], validate=False)
    config.validate()
    return config


def resolve_path(path: str) -> str:
    """Config paths are relative to the working directory, falling back to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    return str(REPO_ROOT / p) if (REPO_ROOT / p).exists() else str(p)
