"""The synthetic world's auxiliary training, behind one hook the trainer calls.

A run on the synthetic GRIT world (the embedded model's) may add, to the answer loss, losses that
read the world's ground truth (`data.scene_records`, attached to the batches by
ferret.training.scene_targets):

* the dense readout (`train.dense_loss_weight`, ferret.training.dense_supervision) on the
  projected image tokens and the region embeddings, with the box code
  (`train.box_code_weight`, ferret.training.grounding.box_code_loss);
* attention supervision (`train.attention_supervision_*`) and number smoothing
  (`train.number_smoothing_*`, `train.init_number_rows`), ferret.training.grounding;
* a stage-1 warm-up of the vision side alone on the dense readout (`train.vision_warmup_*`).

`SyntheticWorldSupervision` holds all of it: the trainer builds it once, calls `warm_up` before
the loop, `add_losses` after each forward and `step_metrics` after each step. With none of the
keys set it adds nothing and costs nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ferret.training.config import TrainConfig, TrainConfigError, resolve_path
from ferret.training.distributed import bf16_autocast
from ferret.training.model_setup import unwrap
from ferret.training.schedule import lr_multiplier
from ferret.training.seeding import region_seed


class DenseReadout:
    """The dense auxiliary loss (ferret.training.dense_supervision) on the projected image tokens and the
    region embeddings of the forward pass just run, captured by hooks (the model is not modified).
    A training step runs the region module once, on every image in batch order (the gradient
    cover, ferret.training.gradient_cover), so its output lines up with the batch."""

    def __init__(self, model, tokenizer):
        from ferret.training.dense_supervision import DenseVocabulary, NameDirections

        base = unwrap(model)
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
        self.region_box_code_weight = 0.0  # x the box code's loss on the region embeddings
        base.model.mm_projector.register_forward_hook(self._capture_tokens)
        if base.model.region_module is not None:
            base.model.region_module.register_forward_hook(self._capture_regions)

    def _capture_tokens(self, _module, _inputs, output) -> None:
        self.tokens = output

    def _capture_regions(self, _module, _inputs, output) -> None:
        self.regions = output

    def box_code_term(self, tokens: torch.Tensor, patch_box: torch.Tensor, covered: torch.Tensor,
                      number_rows: torch.Tensor | None = None, weight: float | None = None) -> torch.Tensor:
        """weight (the box code's unless given) x ferret.training.grounding.box_code_loss (0 without a
        box code)."""
        if self.box_code is None:
            return tokens.new_zeros((), dtype=torch.float32)
        from ferret.training.grounding import box_code_loss

        ids, code_weight, sigma = self.box_code
        weight = code_weight if weight is None else weight
        rows = number_rows if number_rows is not None else self.lm_head.weight[ids.to(self.lm_head.weight.device)]
        return weight * box_code_loss(tokens, patch_box, covered, rows, sigma)

    def loss(self, batch: dict, device: torch.device) -> torch.Tensor:
        from ferret.training.dense_supervision import NameDirections, class_readout_loss, dense_readout_loss

        tokens, regions, self.tokens, self.regions = self.tokens, self.regions, None, None
        if tokens is None or "patch_color" not in batch:
            raise RuntimeError("dense readout: no image tokens or no patch targets in this batch")
        directions = NameDirections.of_module(self.embeddings, self.name_ids)
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
                if self.region_box_code_weight > 0:
                    box = torch.cat([batch["region_box"][i] for i in rows]).to(device)
                    loss = loss + self.box_code_term(embeddings.unsqueeze(0), box.unsqueeze(0), (color > 0).unsqueeze(0),
                                                     weight=self.region_box_code_weight)
        return loss


def grounding_supervision(model, tokenizer, cfg: TrainConfig):
    """(attention supervisions, number token ids or None) for ferret.training.grounding's
    training-only losses; also starts the number rows as a smooth code when configured. The
    supervisions, in order: the box head's (none without train.attention_supervision_weight); the
    presence head's when train.presence_supervision_* puts presence on another head; the name head's
    when train.name_supervision_layer is set; the colour read's when train.name_supervision_colour_head;
    the box name reads' (on the name head or train.name_supervision_boxes_layer/head) when
    train.name_supervision_boxes."""
    from ferret.data.synthetic_tokenizer import number_token_ids
    from ferret.training.grounding import AttentionSupervision, init_coordinate_heads, init_number_rows

    t = cfg.train
    base = unwrap(model)
    number_ids = number_token_ids(tokenizer)
    coordinates = t.attention_supervision_coordinate_heads
    if (t.number_smoothing_weight > 0 or t.init_number_rows or t.box_code_weight > 0) and number_ids is None:
        raise TrainConfigError("train.number_smoothing_weight / init_number_rows / box_code_weight: the tokenizer "
                               "does not write each number 0-999 as one token (build it with number tokens)")
    fresh = cfg.model.pretrained is None  # a pretrained model's number rows and heads are already trained
    if t.init_number_rows and fresh:
        init_number_rows(base, number_ids, blocks=4 if coordinates else 1)
    supervision = []
    if t.attention_supervision_weight > 0:
        presence = (t.attention_supervision_layer if t.presence_supervision_layer is None else t.presence_supervision_layer,
                    t.attention_supervision_head if t.presence_supervision_head is None else t.presence_supervision_head)
        apart = presence != (t.attention_supervision_layer, t.attention_supervision_head)
        try:
            supervision.append(AttentionSupervision(model, tokenizer, t.attention_supervision_layer, t.attention_supervision_head,
                                                    coordinate_heads=coordinates, presence=not apart,
                                                    presence_weight=t.presence_supervision_weight,
                                                    absent_target=t.presence_absent_target))
            if coordinates and fresh:
                init_coordinate_heads(base, t.attention_supervision_layer)
        except ValueError as err:
            raise TrainConfigError(f"train.attention_supervision_layer/head: {err}") from None
        if apart:
            # The presence head also finds each box's object from the box positions (one head, not
            # per coordinate): a head trained by the yes/no answers alone never learnt to match a
            # name with an object (bench/probes/README.md, session 8: full_coordpe_p3 / p3n).
            try:
                supervision.append(AttentionSupervision(model, tokenizer, *presence,
                                                        presence_weight=t.presence_supervision_weight,
                                                    absent_target=t.presence_absent_target))
            except ValueError as err:
                raise TrainConfigError(f"train.presence_supervision_layer/head: {err}") from None
        if t.name_supervision_layer is not None:
            try:
                supervision.append(AttentionSupervision(model, tokenizer, t.name_supervision_layer, t.name_supervision_head,
                                                        boxes=False, presence=False, name=True,
                                                        name_each_word=t.name_supervision_each_word,
                                                        name_copy=t.name_supervision_copy))
            except ValueError as err:
                raise TrainConfigError(f"train.name_supervision_layer/head: {err}") from None
            if t.name_supervision_colour_head is not None:
                try:
                    supervision.append(AttentionSupervision(model, tokenizer, t.name_supervision_layer,
                                                            t.name_supervision_colour_head, boxes=False,
                                                            presence=False, name_colour=True))
                except ValueError as err:
                    raise TrainConfigError(f"train.name_supervision_colour_head: {err}") from None
        if t.name_supervision_boxes:  # its own mean: ~8 queries a box would drown the yes/no reads
            box_names = ((t.name_supervision_layer, t.name_supervision_head) if t.name_supervision_boxes_layer is None
                         else (t.name_supervision_boxes_layer, t.name_supervision_boxes_head))
            try:
                supervision.append(AttentionSupervision(model, tokenizer, *box_names, boxes=False, presence=False,
                                                        name_boxes=True))
            except ValueError as err:
                raise TrainConfigError(f"train.name_supervision_boxes(_layer/_head): {err}") from None
    for head in t.region_name_supervision_heads:
        try:
            supervision.append(AttentionSupervision(model, tokenizer, t.attention_supervision_layer, head,
                                                    boxes=False, presence=False, region_name=True))
        except ValueError as err:
            raise TrainConfigError(f"train.region_name_supervision_heads: {err}") from None
    return supervision, (torch.tensor(number_ids) if number_ids is not None else None)


class SyntheticWorldSupervision:
    """The hook of the synthetic world's auxiliary training (see the module docstring)."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, scene_targets=None):
        self.model, self.cfg, self.scene_targets = model, cfg, scene_targets
        t = cfg.train
        self.readout = DenseReadout(model, tokenizer) if t.dense_loss_weight > 0 else None
        self.attention, self.number_ids = grounding_supervision(model, tokenizer, cfg)
        self.box_name_reads = [head for head in self.attention if head.name_boxes]
        from ferret.training.grounding import AnswerNameReadout, BoxNameReadout

        # name readouts on the box heads' layer: metric prefix -> (readout, weight)
        self.name_readouts = {}
        for prefix, kind in (("box_name", BoxNameReadout), ("answer_name", AnswerNameReadout)):
            weight = getattr(t, f"{prefix}_readout_weight")
            if weight > 0:
                try:
                    self.name_readouts[prefix] = (kind(model, tokenizer, t.attention_supervision_layer), weight)
                except ValueError as err:
                    raise TrainConfigError(f"train.{prefix}_readout_weight (on train.attention_supervision_layer): "
                                           f"{err}") from None
        self._readout = {prefix: [] for prefix in self.name_readouts}
        self._readout_accuracy = {prefix: [] for prefix in self.name_readouts}
        if self.readout is not None and t.box_code_weight > 0:
            self.readout.box_code = (self.number_ids, t.box_code_weight, t.box_code_sigma)
            self.readout.region_box_code_weight = t.region_box_code_weight
        self._dense: list[torch.Tensor] = []
        self._attention: list[torch.Tensor] = []
        self._masses: list[float] = []
        self._head_masses: list[dict[int, float]] = []
        self._region_masses: list[float] = []

    @property
    def reads_all_logits(self) -> bool:
        """Whether add_losses needs the logits at every position (number smoothing does); else the
        trainer asks the model for the labelled positions' logits only."""
        return self.number_ids is not None and self.cfg.train.number_smoothing_weight > 0

    def warm_up(self, image_processor, rank: int, world: int, device: torch.device) -> float | None:
        """Stage 1 (`train.vision_warmup_steps` > 0): see warm_up_vision. None when not configured."""
        if self.cfg.train.vision_warmup_steps <= 0:
            return None
        return warm_up_vision(self.model, self.readout, self.scene_targets, image_processor, self.cfg,
                              rank, world, device)

    def add_losses(self, loss: torch.Tensor, batch: dict, outputs, device: torch.device, step: int) -> torch.Tensor:
        """`loss` (the answer loss of the forward just run, at optimizer step `step` of the stage) plus
        the configured auxiliary losses."""
        t = self.cfg.train
        if t.name_supervision_copy_steps is not None:
            for head in self.attention:
                head.name_copy = bool(head.name_words) and step < t.name_supervision_copy_steps
        if t.name_supervision_boxes_steps is not None:
            for head in self.box_name_reads:
                head.name_boxes = step < t.name_supervision_boxes_steps
        if self.readout is not None:
            # Every rank runs the same graph whether or not this batch has targets.
            dense = self.readout.loss(batch, device) if "patch_color" in batch else loss.new_zeros(())
            loss = loss + t.dense_loss_weight * dense
            self._dense.append(dense.detach().float())
        if self.attention:
            attend = (sum(a.loss(batch) for a in self.attention) if "answer_cells" in batch else loss.new_zeros(()))
            loss = loss + t.attention_supervision_weight * attend
            self._attention.append(attend.detach().float())
            self._masses.append(self.attention[0].last_mass)  # the box heads'
            self._head_masses.append(self.attention[0].last_head_mass)
            self._region_masses += [a.last_mass for a in self.attention if a.region_name]
        for prefix, (readout, weight) in self.name_readouts.items():
            named = readout.loss(batch) if "answer_cells" in batch else loss.new_zeros(())
            loss = loss + weight * named
            self._readout[prefix].append(named.detach().float())
            self._readout_accuracy[prefix].append(readout.last_accuracy)
        if self.number_ids is not None and t.number_smoothing_weight > 0:
            from ferret.training.grounding import number_smoothing_loss, spliced_labels

            labels = spliced_labels(batch["input_ids"], batch["labels"], unwrap(self.model).get_vision_tower().num_patches,
                                    outputs.logits.shape[1]).to(device)
            smooth = number_smoothing_loss(outputs.logits, labels, self.number_ids, t.number_smoothing_sigma)
            loss = loss + t.number_smoothing_weight * smooth
        return loss

    def step_metrics(self, world: int, device: torch.device) -> dict:
        """The step's auxiliary metrics, then a fresh start. Collective when the readout is on:
        its loss is averaged over micro-batches and ranks; the attention's is rank-local (a
        monitor of how far the head looks at the object)."""
        record = {}
        if self.readout is not None:
            dense = torch.stack(self._dense).mean().to(device)
            dist.all_reduce(dense)
            record["dense_loss"] = dense.item() / world
        if self.attention:
            record["attention_loss"] = torch.stack(self._attention).mean().item()
            record["attention_mass"] = float(np.nanmean(self._masses))
            # Each box head's own mass: their mean hid one coordinate head binding late (session 29).
            heads = sorted({h for masses in self._head_masses for h in masses})
            if len(heads) > 1:
                for h in heads:
                    record[f"attention_mass_head{h}"] = float(np.mean([m[h] for m in self._head_masses if h in m]))
        for prefix in self.name_readouts:
            record[f"{prefix}_readout_loss"] = torch.stack(self._readout[prefix]).mean().item()
            read = [a for a in self._readout_accuracy[prefix] if a == a]  # nan: a batch with nothing to read
            record[f"{prefix}_read"] = float(np.mean(read)) if read else float("nan")
            self._readout[prefix], self._readout_accuracy[prefix] = [], []
        region = [m for m in self._region_masses if m == m]  # nan: no referring answer in the batch
        if region:  # the region name heads' mass on the region's object
            record["region_name_mass"] = float(np.mean(region))
        self._dense, self._attention, self._masses, self._head_masses = [], [], [], []
        self._region_masses = []
        return record

    @staticmethod
    def describe(record: dict) -> str:
        """The auxiliary part of a step's log line."""
        heads = [value for key, value in record.items() if key.startswith("attention_mass_head")]  # in head order
        return ((f" dense_loss {record['dense_loss']:.4f}" if "dense_loss" in record else "")
                + (f" attention_mass {record['attention_mass']:.3f}" if "attention_mass" in record else "")
                + (" (" + "/".join(f"{m:.2f}" for m in heads) + ")" if heads else "")
                + (f" region_name_mass {record['region_name_mass']:.3f}" if "region_name_mass" in record else ""))


# --------------------------------------------------------------------------- stage 1: vision warm-up


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


def warm_up_vision(model, readout: DenseReadout, scene_targets, image_processor, cfg: TrainConfig,
                   rank: int, world: int, device: torch.device) -> float:
    """Stage 1, for a tower trained from scratch: the vision tower, projector and region module
    alone, trained on the dense readout (no LLM forward): `train.vision_warmup_steps` steps of
    world x per_device_batch_size x vision_warmup_batch_multiple scenes drawn from the scene
    records, each step also one referred object (its visible mask or its box) in
    per_device_batch_size of them for the region module. Plain AdamW in fp32 (bf16 autocast when the
    run is bf16), gradients averaged over the ranks, linear warm-up then cosine; every rank ends
    with the same weights. Returns the mean loss of the last tenth of the steps."""
    base = unwrap(model)
    modules = [m for m in (base.model.vision_tower, base.model.mm_projector, base.model.region_module) if m is not None]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError("train.vision_warmup_steps: the vision tower, projector and region sampler are "
                               "all frozen; there is nothing to warm up")
    stored_dtype = params[0].dtype
    for module in modules:
        module.float()
    steps, t = cfg.train.vision_warmup_steps, cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.vision_warmup_learning_rate, weight_decay=0.0)
    start, losses = time.perf_counter(), []
    step_loss = WarmUpStep(base, readout, scene_targets, image_processor, cfg, rank, world, device)
    for step in range(steps):
        loss = step_loss(step)
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
    # The last step's gradients would otherwise be added into the first LLM step's (autograd
    # accumulates into .grad): the one launch then trained unlike a run from the warm-up's export.
    optimizer.zero_grad(set_to_none=True)
    for module in modules:
        module.to(stored_dtype)
    # first and last tenth's mean: a falling loss says the tower learned
    tenth = max(1, steps // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    if rank == 0:
        print(f"[ferret_train] vision warm-up done: {steps} steps, readout loss {first:.4f} -> {last:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return last


class WarmUpStep:
    """The readout loss of one warm-up step on this rank's slice of that step's scenes."""

    def __init__(self, base, readout: DenseReadout, scene_targets, image_processor, cfg: TrainConfig,
                 rank: int, world: int, device: torch.device):
        from ferret.training.dense_supervision import NameDirections

        t = cfg.train
        self.base, self.readout, self.targets, self.image_processor = base, readout, scene_targets, image_processor
        self.t, self.rank, self.world, self.device = t, rank, world, device
        self.per_rank = t.per_device_batch_size * t.vision_warmup_batch_multiple
        self.image_root = Path(resolve_path(cfg.data.scene_records)).parent
        self.scene_ids = sorted(scene_targets.records)
        self.directions = NameDirections.from_embeddings(readout.embeddings.weight, readout.name_ids)  # fixed: the LLM waits
        self.number_rows = None if readout.box_code is None else readout.lm_head.weight[readout.box_code[0]].detach().float()
        self.draw = torch.Generator().manual_seed(t.seed)  # same draw on every rank; each takes its slice
        self.autocast = bf16_autocast(t.precision, device)

    def __call__(self, step: int) -> torch.Tensor:
        from ferret.processing import preprocess_images
        from ferret.training.dense_supervision import dense_readout_loss

        t, rank, per_rank, readout, device = self.t, self.rank, self.per_rank, self.readout, self.device
        picks = torch.randint(len(self.scene_ids), (self.world * per_rank,), generator=self.draw)
        records = [self.targets.records[self.scene_ids[i]] for i in picks[rank * per_rank:(rank + 1) * per_rank].tolist()]
        pixels = preprocess_images([str(self.image_root / r["image"]) for r in records], self.image_processor).to(device)
        targets = [self.targets[r["scene_id"]] for r in records]
        with self.autocast:
            features, tokens = self.base.encode_images(pixels)
        stacked = {k: torch.stack([x[k] for x in targets]).to(device) for k in ("patch_color", "patch_shape", "patch_box")}
        loss = dense_readout_loss(tokens.float(), stacked["patch_color"], stacked["patch_shape"], stacked["patch_box"],
                                  readout.vocabulary, self.directions)
        loss = loss + readout.box_code_term(tokens, stacked["patch_box"], stacked["patch_color"] > 0, self.number_rows)
        if self.base.model.region_module is not None:
            loss = loss + self.region_loss(features, records, step)
        return loss

    def region_loss(self, features: torch.Tensor, records: list, step: int) -> torch.Tensor:
        """The region module's readout of one referred object in each of the first
        per_device_batch_size scenes. It reads the tower's features but does not train them: its
        gradient through the sampled points held the tower's object-level shape readout at 0.31
        after 400 warm-up steps, 0.56 without it (bench/probes/README.md, "warm-up ablation")."""
        from ferret.training.dense_supervision import class_readout_loss, region_object_targets

        t, readout = self.t, self.readout
        chosen = records[: t.per_device_batch_size]
        masks = warm_up_region_masks(chosen, np.random.default_rng([t.seed, step, self.rank]))
        with self.autocast:
            embeddings = self.base.encode_regions(features[: len(chosen)].detach(), [[m] for m in masks],
                                                  generator=torch.Generator().manual_seed(region_seed(t.seed, step, self.rank, 0)))
        classes = [region_object_targets(r, [m], readout.vocabulary) for r, m in zip(chosen, masks)]
        return class_readout_loss(torch.cat(embeddings).float(),
                                  torch.cat([c["region_color"] for c in classes]).to(self.device),
                                  torch.cat([c["region_shape"] for c in classes]).to(self.device),
                                  readout.vocabulary, self.directions)
