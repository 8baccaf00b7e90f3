"""Training-only supervision that teaches a small LLM trained from scratch to ground.

A tiny LLM trained on the answer loss alone learns the answer format and copies the object's
name from the question, then writes an average box: it never learns to read the image (issue
13's probes: 6-9 % of its boxes overlapped any object). The synthetic world knows where every
object is, so training adds:

* **Attention supervision** (`AttentionSupervision`). One attention head of one decoder layer is
  pushed, from every answer position that writes a box (the `[` and the tokens inside the
  brackets), onto the image tokens of the object that box belongs to: loss = -log(attention mass
  on the object's cells). For "Is there a X?" questions the position that writes "Yes"/"No" is
  pushed onto X's cells when X is in the image, and onto the first token (BOS, an attention sink)
  when it is not, so what the head reads there says whether X was found. That head's query can
  only depend on X if an earlier layer brought X's words to that position: `name=True` pushes a
  head of an earlier layer, from the same position, onto the question's colour and shape tokens
  (the shipped model's layer 0 learnt such a head by itself; the position-code runs never did,
  and their presence head then looked the same way whatever was asked). `name_boxes=True` pushes
  a head likewise from the positions that write a box's numbers onto the box's colour and shape
  words: a coordinate head matches the object only if its query holds both (a draw whose x1
  position read the shape word alone put 0.19 of that head's attention on same-shape objects).
  The head's queries and keys are recomputed from the layer's input (captured by a forward
  pre-hook), so the model and its attention kernel are unchanged and the exported model carries
  nothing of it.
* **Coordinate heads** (`AttentionSupervision(coordinate_heads=True)`, `box_code_loss`,
  `init_coordinate_heads`). Copying a box needs the head that finds the object to bring back one
  coordinate at a time. The hidden width is split in 4 blocks, one per coordinate (x1, y1, x2,
  y2); each image token learns (dense loss) to hold, in block c, a vector that the number tokens'
  output rows read as its object's coordinate c; head c of the supervised layer attends to the
  object from the positions that write the box's c-th number and to the BOS sink from the
  positions that write the others, and starts with a value/output map that copies block c.
  Written out, the LM's logits over the number tokens then peak at the object's coordinate.
  With a digit tokenizer the heads work the same way from every position that writes one of the
  c-th number's digits; the box code, which the number tokens' rows read, needs number tokens.
* **Number tokens with a smooth code** (`init_number_rows`, `number_smoothing_loss`). With one
  token per integer 0-999 (`ferret.data.synthetic_tokenizer.number_token_ids`), the input and
  output embedding rows of the numbers start as a sinusoidal code of the value (nearby values: similar rows), and
  an optional loss spreads each number's target over its neighbours (a Gaussian on the 0-999
  grid), so "off by 3" costs less than "off by 300".

Per-sample targets: `answer_box_cells` (which cells each answer box's object covers) is built by
`ferret.training.dense_supervision.ScenePatchTargets` from the scene records.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ferret.training.model_setup import unwrap

BOX_COORDINATES = 4  # x1, y1, x2, y2


def bracket_token_ids(tokenizer) -> tuple[set[int], set[int]]:
    """Ids of the tokens holding "[" and those holding "]" (BPE may glue them to a space or dot)."""
    vocab = tokenizer.get_vocab()
    return ({i for t, i in vocab.items() if "[" in t}, {i for t, i in vocab.items() if "]" in t})


def answer_box_spans(input_ids: torch.Tensor, labels: torch.Tensor, open_ids: set[int],
                     close_ids: set[int]) -> list[tuple[int, int]]:
    """[start, end) of every box the answers write, in text order: from the supervised token
    holding "[" up to (not including) the next token holding "]". Each of these positions
    predicts a piece of the box. A box cut by truncation (no "]") is dropped."""
    ids = input_ids.tolist()
    supervised = (labels != IGNORE_INDEX).tolist()
    spans, start = [], None
    for j, (token, answer) in enumerate(zip(ids, supervised)):
        if not answer:
            start = None
            continue
        if token in open_ids and token not in close_ids:
            start = j
        elif token in close_ids and start is not None:
            spans.append((start, j))
            start = None
    return spans


def number_runs(input_ids: torch.Tensor, span: tuple[int, int], number_ids: set[int]) -> list[list[int]]:
    """The positions in `span` that write each of the box's numbers, one list per number, in
    order: those whose next token is a number token. With one token per number 0-999 each list
    holds one position; with digits, the consecutive positions that write the number's digits."""
    ids = input_ids.tolist()
    runs: list[list[int]] = []
    for j in range(*span):
        if j + 1 < len(ids) and ids[j + 1] in number_ids:
            if runs and runs[-1][-1] == j - 1:
                runs[-1].append(j)
            else:
                runs.append([j])
    return runs


def answer_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each supervised run of `labels` (one per assistant turn), in order."""
    supervised = (labels != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for j, on in enumerate(supervised):
        if on and start is None:
            start = j
        elif not on and start is not None:
            runs.append((start, j))
            start = None
    return runs


def asked_name_positions(input_ids: torch.Tensor, answer_start: int, name_ids: set[int]) -> tuple[int, ...]:
    """Text positions of the asked name's words (the last colour and shape tokens before the
    answer that starts at `answer_start`, at most two), in order; () when the question has none."""
    ids = input_ids[:answer_start].tolist()
    found = [j for j, token in enumerate(ids) if token in name_ids]
    return tuple(found[-2:])


def name_word_ids(tokenizer, words: set[str]) -> dict[int, str]:
    """Token id -> name word, for every token that is a name word after a space, with or without
    trailing punctuation: BPE glues the question's last word to its mark (" cross?")."""
    out = {}
    for token, i in tokenizer.get_vocab().items():
        word = token.lstrip("\u2581 ").rstrip("?.,!")
        if token[:1] in ("\u2581", " ") and word in words:
            out[i] = word
    return out


def name_copy_queries(input_ids: torch.Tensor, labels: torch.Tensor, word_of: dict[int, str]) -> list[tuple[int, tuple[int, ...]]]:
    """(position, question positions) for each answer token that repeats a name word of its own
    turn's question (`word_of`: name_word_ids): the position before it (which writes it) and where
    the question holds that word. Only turns whose question names one object (at most two name
    words): with two offered names (the LVIS choice) which to copy depends on the image."""
    ids = input_ids.tolist()
    out, question_start = [], 0
    for start, end in answer_runs(labels):
        asked = [j for j in range(question_start, start) if ids[j] in word_of]
        if 0 < len(asked) <= 2:
            for j in range(max(start, 1), end):
                same = tuple(a for a in asked if ids[j] in word_of and word_of[ids[a]] == word_of[ids[j]])
                if same:
                    out.append((j - 1, same))
        question_start = end
    return out


def spliced_index(input_ids_row: torch.Tensor, num_image_tokens: int) -> tuple[int, callable]:
    """(image start in the spliced sequence, map text index -> spliced index) for one sample whose
    single image placeholder expands into `num_image_tokens` embeddings."""
    where = (input_ids_row == IMAGE_TOKEN_INDEX).nonzero()
    if len(where) != 1:
        raise ValueError(f"attention supervision needs exactly one image per sample, found {len(where)}")
    p = int(where[0])
    return p, (lambda j: j if j < p else j + num_image_tokens - 1)


class AttentionSupervision:
    """-log(attention mass on the answer box's object) for one head of one decoder layer.

    Installs a forward pre-hook on `layers[layer].self_attn` that keeps the layer's input hidden
    states and rotary embeddings of the last forward; `loss(batch)` then recomputes that head's
    attention rows at the box positions. Call `loss` after each training forward."""

    def __init__(self, model, tokenizer, layer: int, head: int, coordinate_heads: bool = False,
                 boxes: bool = True, presence: bool = True, name: bool = False, presence_weight: float = 1.0,
                 absent_target: str = "bos", name_each_word: bool = False, name_copy: bool = False,
                 name_boxes: bool = False, name_colour: bool = False, region_name: bool = False):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        from ferret.data.synthetic_tokenizer import digit_token_ids, number_token_ids

        base = unwrap(model)
        layers = base.model.layers
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"attention supervision: layer {layer} outside the model's {len(layers)} layers")
        self.attention = layers[layer].self_attn
        heads = base.config.num_attention_heads
        if not 0 <= head < heads:
            raise ValueError(f"attention supervision: head {head} outside the model's {heads} heads")
        self.head = head
        self.coordinate_heads = coordinate_heads
        self.boxes, self.presence = boxes, presence  # which answer positions this instance supervises
        # A "Yes"/"No" query's loss counts this many times a box query's (there is one per yes/no
        # answer against ~16 box queries per box on the same head).
        self.presence_weight = presence_weight
        # Where an absent name's query is pushed: "bos" (the sink every head shares) or "self" (the
        # query's own position, a key the presence head can set at its own threshold).
        if absent_target not in ("bos", "self"):
            raise ValueError(f"attention supervision: absent target {absent_target!r} is not 'bos' or 'self'")
        self.absent_target = absent_target
        # The name head's target: the asked words together (one query; the head may look at the
        # shape word alone, as full_coordpe_v2n's did) or each word on its own (one query per word,
        # so the head splits its attention and carries the colour too).
        self.name_each_word = name_each_word
        # Also from each answer position that writes one of the question's name words, onto that
        # word in the question (the copy the answer's restated name needs).
        self.name_copy = name_copy
        # From each answer position that writes a name word of a turn about one region, onto the
        # region's object (scene_targets.region_cells), not a colour twin.
        self.region_name = region_name
        self.name_words: dict[int, str] = {}
        if name_copy or region_name:
            from ferret.training.dense_supervision import DenseVocabulary

            vocabulary = DenseVocabulary.synthetic()
            self.name_words = name_word_ids(tokenizer, set(vocabulary.colors) | set(vocabulary.shapes))
        self.name = name  # from the yes/no position onto the asked name's words
        # From the positions that write a box's numbers onto the box's own name words (the two
        # before its "["), each word its own query: the coordinate heads' queries there need both.
        self.name_boxes = name_boxes
        # From the yes/no position onto the asked colour word alone: both draws whose yes/no answers
        # held the conjunction had a second layer-0 head doing this unasked (session 31).
        self.name_colour = name_colour
        self.name_ids: set[int] = set()
        self.colour_ids: set[int] = set()
        if name or name_boxes or name_colour:
            from ferret.training.dense_supervision import DenseVocabulary, NameDirections

            colors, shapes = NameDirections.token_ids(tokenizer, DenseVocabulary.synthetic())
            self.name_ids, self.colour_ids = set(colors) | set(shapes), set(colors)
        if coordinate_heads or name_boxes:
            if coordinate_heads and heads < BOX_COORDINATES:
                raise ValueError(f"attention supervision: coordinate heads need {BOX_COORDINATES} heads, the model has {heads}")
            numbers = number_token_ids(tokenizer) or digit_token_ids(tokenizer)
            if numbers is None:
                raise ValueError("attention supervision: coordinate heads and box name reads need one token per "
                                 "number 0-999 or per digit")
            self.number_ids = set(numbers)
        self.head_dim = self.attention.head_dim
        self.kv_group = heads // base.config.num_key_value_heads
        self.num_image_tokens = base.get_vision_tower().num_patches
        self.open_ids, self.close_ids = bracket_token_ids(tokenizer)
        self.rotary = apply_rotary_pos_emb
        self.captured: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.attention.register_forward_pre_hook(self._capture, with_kwargs=True)
        self.last_mass = float("nan")
        self.last_head_mass: dict[int, float] = {}  # per head: a coordinate head can bind alone

    def _capture(self, _module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.captured = (hidden, kwargs["position_embeddings"])

    def _head_logits(self, hidden_row, cos_row, sin_row, queries: list[int], head: int) -> torch.Tensor:
        """Attention logits [Q, last] of `head` at `queries` (causal part only)."""
        attn, d = self.attention, self.head_dim
        kv = head // self.kv_group
        last = max(queries) + 1
        w_q, w_k = attn.q_proj.weight[head * d:(head + 1) * d], attn.k_proj.weight[kv * d:(kv + 1) * d]
        b_q = attn.q_proj.bias[head * d:(head + 1) * d] if attn.q_proj.bias is not None else None
        b_k = attn.k_proj.bias[kv * d:(kv + 1) * d] if attn.k_proj.bias is not None else None
        h = hidden_row[:last].float()
        q = F.linear(h[queries], w_q.float(), None if b_q is None else b_q.float())
        k = F.linear(h, w_k.float(), None if b_k is None else b_k.float())
        q_rot, _ = self.rotary(q[None, None], q[None, None], cos_row[None, queries].float(), sin_row[None, queries].float())
        _, k_rot = self.rotary(k[None, None], k[None, None], cos_row[None, :last].float(), sin_row[None, :last].float())
        logits = (q_rot[0, 0] @ k_rot[0, 0].T) / math.sqrt(d)
        causal = torch.arange(last, device=logits.device)[None, :] <= torch.tensor(queries, device=logits.device)[:, None]
        return logits.masked_fill(~causal, float("-inf"))

    def _queries(self, batch: dict, row: int) -> list[tuple[int, int, torch.Tensor, tuple[int, ...], float]]:
        """(text position, head, target row [1 + cells]: BOS sink, then the cells, target text
        positions, weight) to supervise."""
        ids, labels, cells = batch["input_ids"][row], batch["labels"][row], batch["answer_cells"][row]
        n_cells = cells.shape[1]
        bos = torch.zeros(1 + n_cells, dtype=torch.bool)
        bos[0] = True
        out = []
        spans = answer_box_spans(ids, labels, self.open_ids, self.close_ids) if self.boxes else []
        for i, span in enumerate(spans[: len(cells)]):
            target = F.pad(cells[i], (1, 0))
            if not self.coordinate_heads:
                out += [(j, self.head, target, (), 1.0) for j in range(*span)]
                continue
            for k, run in enumerate(number_runs(ids, span, self.number_ids)[:BOX_COORDINATES]):
                out += [(j, c, target if c == k else bos, (), 1.0) for j in run for c in range(BOX_COORDINATES)]
        if self.name_boxes:
            for start, end in answer_box_spans(ids, labels, self.open_ids, self.close_ids):
                words = [j for j in (start - 2, start - 1) if j >= 0 and int(ids[j]) in self.name_ids]
                for run in number_runs(ids, (start, end), self.number_ids)[:BOX_COORDINATES]:
                    out += [(j, self.head, torch.zeros_like(bos), (w,), 1.0) for j in run for w in words]
        if self.name_copy:
            out += [(j, self.head, torch.zeros_like(bos), words, 1.0) for j, words in name_copy_queries(ids, labels, self.name_words)]
        if self.region_name and "region_cells" in batch:
            for (start, end), object_cells in zip(answer_runs(labels), batch["region_cells"][row]):
                if bool(object_cells.any()):
                    target = F.pad(object_cells, (1, 0))
                    out += [(j - 1, self.head, target, (), 1.0) for j in range(max(start, 1), end)
                            if int(ids[j]) in self.name_words]
        presence = batch.get("presence_cells") if (self.presence or self.name or self.name_colour) else None
        if presence is not None and len(presence[row]):
            for (start, _), target in zip(answer_runs(labels), presence[row]):
                if not bool(target.any()) or start == 0:
                    continue
                if self.presence:  # from the position that writes "Yes" / "No"
                    if self.absent_target == "self" and not bool(target[1:].any()):
                        out.append((start - 1, self.head, torch.zeros_like(target), (start - 1,), self.presence_weight))
                    else:
                        out.append((start - 1, self.head, target, (), self.presence_weight))
                if self.name:
                    words = asked_name_positions(ids, start, self.name_ids)
                    groups = [(j,) for j in words] if self.name_each_word else [words]
                    out += [(start - 1, self.head, torch.zeros_like(target), group, 1.0) for group in groups if group]
                if self.name_colour:
                    colour = tuple(j for j in asked_name_positions(ids, start, self.name_ids) if int(ids[j]) in self.colour_ids)
                    if colour:
                        out.append((start - 1, self.head, torch.zeros_like(target), colour, 1.0))
        return out

    def loss(self, batch: dict) -> torch.Tensor:
        if self.captured is None:
            raise RuntimeError("attention supervision: no forward pass captured")
        hidden, (cos, sin) = self.captured
        self.captured = None
        total, count, by_head = hidden.new_zeros((), dtype=torch.float32), 0, {}
        for row in range(len(batch["answer_cells"])):
            queries = self._queries(batch, row)
            if not queries:
                continue
            image_start, to_spliced = spliced_index(batch["input_ids"][row], self.num_image_tokens)
            for head in sorted({q[1] for q in queries}):
                mine = [(to_spliced(j), t, words) for j, h, t, words, _ in queries if h == head]
                weights = torch.tensor([w for _, h, _, _, w in queries if h == head])
                positions = [p for p, _, _ in mine]
                logits = self._head_logits(hidden[row], cos[row], sin[row], positions, head)
                targets = torch.stack([t for _, t, _ in mine]).to(logits.device)
                on_target = torch.zeros_like(logits, dtype=torch.bool)
                on_target[:, 0] = targets[:, 0]
                on_target[:, image_start:image_start + self.num_image_tokens] = targets[:, 1:]
                for q, (_, _, words) in enumerate(mine):
                    on_target[q, [to_spliced(j) for j in words]] = True
                log_all = torch.logsumexp(logits, dim=-1)
                log_target = torch.logsumexp(logits.masked_fill(~on_target, float("-inf")), dim=-1)
                total = total + ((log_all - log_target) * weights.to(logits.device)).sum()
                count += len(positions)
                on_object = targets[:, 1:].any(-1)
                if bool(on_object.any()):
                    by_head.setdefault(head, []).append((log_target - log_all)[on_object].exp().detach())
        masses = [m for head_masses in by_head.values() for m in head_masses]
        self.last_mass = torch.cat(masses).mean().item() if masses else float("nan")
        self.last_head_mass = {head: torch.cat(m).mean().item() for head, m in sorted(by_head.items())}
        return total / max(count, 1)


class NameReadout:
    """Cross-entropy of an object's colour and shape, read from the input of one decoder layer (after
    its input norm) at the text positions `queries` picks, on the names' word-embedding directions
    (ferret.training.dense_supervision.class_logits). Captured by a forward pre-hook, like
    AttentionSupervision; training only, the exported model carries nothing of it."""

    what = "name readout"

    def __init__(self, model, tokenizer, layer: int):
        from ferret.training.dense_supervision import DenseVocabulary, NameDirections

        base = unwrap(model)
        layers = base.model.layers
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"{self.what}: layer {layer} outside the model's {len(layers)} layers")
        self.embeddings = base.get_input_embeddings()
        self.token_ids = NameDirections.token_ids(tokenizer, DenseVocabulary.synthetic())
        # class 0 is class_logits' background; a name word's class is 1 + its index
        self.colour_class = {i: k + 1 for k, i in enumerate(self.token_ids[0])}
        self.shape_class = {i: k + 1 for k, i in enumerate(self.token_ids[1])}
        self.num_image_tokens = base.get_vision_tower().num_patches
        self.captured: torch.Tensor | None = None
        layers[layer].self_attn.register_forward_pre_hook(self._capture, with_kwargs=True)
        self.last_accuracy = float("nan")  # both words read right, over the last batch's queries

    def _capture(self, _module, args, kwargs):
        self.captured = kwargs.get("hidden_states", args[0] if args else None)

    def queries(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, int]]:
        """(text position, colour class, shape class) to read in one sample."""
        raise NotImplementedError

    def loss(self, batch: dict) -> torch.Tensor:
        from ferret.training.dense_supervision import NameDirections, class_logits

        if self.captured is None:
            raise RuntimeError(f"{self.what}: no forward pass captured")
        hidden, self.captured = self.captured, None
        vectors, colours, shapes = [], [], []
        for row in range(hidden.shape[0]):
            found = self.queries(batch["input_ids"][row], batch["labels"][row])
            if not found:
                continue
            _, to_spliced = spliced_index(batch["input_ids"][row], self.num_image_tokens)
            vectors.append(hidden[row, [to_spliced(j) for j, _, _ in found]])
            colours += [c for _, c, _ in found]
            shapes += [s for _, _, s in found]
        if not vectors:
            self.last_accuracy = float("nan")
            return hidden.sum() * 0.0  # every rank runs the same graph
        directions = NameDirections.of_module(self.embeddings, self.token_ids)
        colour_logits, shape_logits = class_logits(torch.cat(vectors), directions)
        colour = torch.tensor(colours, device=colour_logits.device)
        shape = torch.tensor(shapes, device=shape_logits.device)
        right = (colour_logits.argmax(-1) == colour) & (shape_logits.argmax(-1) == shape)
        self.last_accuracy = right.float().mean().item()
        return F.cross_entropy(colour_logits, colour) + F.cross_entropy(shape_logits, shape)


class BoxNameReadout(NameReadout):
    """The name readout at the positions that write each answer box's numbers, on the coordinate
    heads' layer (what their queries are made of). It asks the layers below to bring the box's
    name to those positions without saying which head does it: a draw whose x1 position read the
    shape word alone matched same-shape objects (session 30), and pushing a chosen head to read
    the name there (`name_boxes`) cost the yes/no answers their head."""

    what = "box name readout"

    def __init__(self, model, tokenizer, layer: int):
        from ferret.data.synthetic_tokenizer import digit_token_ids, number_token_ids

        super().__init__(model, tokenizer, layer)
        numbers = number_token_ids(tokenizer) or digit_token_ids(tokenizer)
        if numbers is None:
            raise ValueError(f"{self.what}: needs one token per number 0-999 or per digit")
        self.number_ids = set(numbers)
        self.open_ids, self.close_ids = bracket_token_ids(tokenizer)

    def queries(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, int]]:
        """(text position, colour class, shape class) for each position that writes a number of a
        box whose "[" follows its object's colour and shape words."""
        out = []
        for start, end in answer_box_spans(input_ids, labels, self.open_ids, self.close_ids):
            if start < 2:
                continue
            colour = self.colour_class.get(int(input_ids[start - 2]))
            shape = self.shape_class.get(int(input_ids[start - 1]))
            if colour is None or shape is None:
                continue
            for run in number_runs(input_ids, (start, end), self.number_ids)[:BOX_COORDINATES]:
                out += [(j, colour, shape) for j in run]
        return out


class AnswerNameReadout(NameReadout):
    """The name readout at the two positions that write each colour-and-shape name of
    the answers ("A yellow cross.", "An orange star.", "The green square [..]"): the input of the
    same layer reads the whole name there, the shape already where the colour word is written.
    Why: most wrong names are wrong shapes, decided in the decoder's third layer and never
    corrected although the image tokens and the region embedding hold the right shape for about
    a third of them (session 37); this asks the two layers below to bring the shape up first."""

    what = "answer name readout"

    def queries(self, input_ids: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, int, int]]:
        """(text position, colour class, shape class) for the positions whose next tokens, both
        supervised, are a colour word then a shape word, and for the colour word's own position."""
        ids = input_ids.tolist()
        supervised = (labels != IGNORE_INDEX).tolist()
        out = []
        for j in range(1, len(ids) - 1):
            colour, shape = self.colour_class.get(ids[j]), self.shape_class.get(ids[j + 1])
            if colour is not None and shape is not None and supervised[j] and supervised[j + 1]:
                out += [(j - 1, colour, shape), (j, colour, shape)]
        return out


@torch.no_grad()
def init_coordinate_heads(model, layer: int) -> None:
    """Heads 0-3 of `layer` start copying block c (of 4 equal blocks of the hidden width) of what they
    attend to into block c of the residual: value rows = identity on block c, output columns =
    identity into block c (needs head_dim == hidden / 4)."""
    base = unwrap(model)
    attention = base.model.layers[layer].self_attn
    hidden, d = base.config.hidden_size, attention.head_dim
    if d * BOX_COORDINATES != hidden or base.config.num_key_value_heads != base.config.num_attention_heads:
        raise ValueError(f"coordinate heads need head_dim x 4 == hidden_size (got {d} x 4 vs {hidden}) and no grouped KV")
    eye = torch.eye(d, dtype=attention.v_proj.weight.dtype)
    for c in range(BOX_COORDINATES):
        attention.v_proj.weight[c * d:(c + 1) * d] = 0
        attention.v_proj.weight[c * d:(c + 1) * d, c * d:(c + 1) * d] = eye
        attention.o_proj.weight[:, c * d:(c + 1) * d] = 0
        attention.o_proj.weight[c * d:(c + 1) * d, c * d:(c + 1) * d] = eye


def box_code_loss(image_tokens: torch.Tensor, patch_box: torch.Tensor, covered: torch.Tensor,
                  number_rows: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-entropy of each covered image token's coordinate blocks read by the number tokens'
    output rows: block c of token [.., hidden] against block c of number_rows [1000, hidden] gives
    logits over 0..999 for coordinate c of the token's object box (patch_box, 0-999 grid), with a
    Gaussian target of std `sigma`.

    The rows are read at unit norm per block (the scale `init_number_rows` gives them with
    coordinate blocks): with the raw rows of the embeddings' initial norm (~0.16 a block) the
    projector's first tokens (norm ~0.3) read a flat distribution, and the box code stayed at
    chance through 400 warm-up steps (probe coordpe, first try). At unit rows the loss is lowest
    for a block of norm ~8, what the final RMSNorm hands the LM head (sqrt(256 / 4)), so the
    sharpness learnt here is the sharpness the LM reads."""
    tokens = image_tokens[:, -covered.shape[-1]:][covered].float()  # [M, hidden]
    if tokens.shape[0] == 0:
        return image_tokens.new_zeros((), dtype=torch.float32)
    boxes = patch_box[covered].float()  # [M, 4]
    grid = torch.arange(number_rows.shape[0], device=tokens.device, dtype=torch.float32)
    target = torch.softmax(-0.5 * ((grid - boxes[..., None]) / sigma) ** 2, dim=-1)  # [M, 4, numbers]
    return -(target * F.log_softmax(box_code_logits(tokens, number_rows), dim=-1)).sum(-1).mean()


def box_code_logits(tokens: torch.Tensor, number_rows: torch.Tensor) -> torch.Tensor:
    """[M, 4, numbers]: block c of each token [M, hidden] read by block c of the number rows, the
    rows at unit norm per block (see box_code_loss)."""
    d = tokens.shape[-1] // BOX_COORDINATES
    blocks = tokens.float().reshape(len(tokens), BOX_COORDINATES, d)
    rows = F.normalize(number_rows.float().reshape(len(number_rows), BOX_COORDINATES, d), dim=-1)
    return torch.einsum("mcd,ncd->mcn", blocks, rows)


# ------------------------------------------------------------------ number tokens


def smooth_number_code(values: torch.Tensor, width: int, min_period: float = 6.0, max_period: float = 4000.0) -> torch.Tensor:
    """[len(values), width] sinusoidal code of integers on the 0-999 grid: sin/cos pairs at periods
    spaced geometrically from `min_period` to `max_period`, unit norm. The dot product of two
    codes is a kernel that peaks at equal values and falls off with their distance."""
    pairs = width // 2
    periods = torch.logspace(math.log10(max_period), math.log10(min_period), pairs, dtype=torch.float64)
    angles = 2 * math.pi * values.double()[:, None] / periods[None, :]
    code = torch.zeros(len(values), width, dtype=torch.float64)
    code[:, 0:2 * pairs:2], code[:, 1:2 * pairs:2] = angles.sin(), angles.cos()
    return F.normalize(code, dim=-1).float()


@torch.no_grad()
def init_number_rows(model, number_ids: Sequence[int], blocks: int = 1) -> None:
    """Start the input and output embedding rows of the number tokens as the smooth code of their
    value, scaled to the mean norm of the other rows. With `blocks` > 1 (the coordinate heads) the
    code is repeated in each of `blocks` equal slices of the width and every slice has unit norm:
    the final RMSNorm hands the LM head a hidden state of norm ~sqrt(hidden), so a copied block
    then reads as logits with several nats of contrast from the first step, where rows of the
    other rows' norm (~0.3) would give a nearly flat distribution over the 1000 numbers."""
    ids = torch.tensor(list(number_ids))
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        others = torch.ones(matrix.shape[0], dtype=torch.bool)
        others[ids] = False
        scale = matrix[others].float().norm(dim=-1).mean() if blocks == 1 else math.sqrt(blocks)
        code = smooth_number_code(torch.arange(len(ids)), matrix.shape[1] // blocks).repeat(1, blocks)
        matrix[ids] = (F.normalize(code, dim=-1) * scale).to(matrix.dtype)


def spliced_labels(input_ids: torch.Tensor, labels: torch.Tensor, num_image_tokens: int, width: int) -> torch.Tensor:
    """The labels as the model's forward sees them after each image placeholder became
    `num_image_tokens` embeddings (IGNORE on those), right padded to `width`."""
    out = torch.full((labels.shape[0], width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for row in range(labels.shape[0]):
        where = (input_ids[row] == IMAGE_TOKEN_INDEX).nonzero()
        if len(where) == 0:
            n = min(width, labels.shape[1])
            out[row, :n] = labels[row, :n]
            continue
        p = int(where[0])
        tail = labels[row, p + 1:]
        n = min(width - (p + num_image_tokens), len(tail))
        out[row, :p] = labels[row, :p]
        if n > 0:
            out[row, p + num_image_tokens:p + num_image_tokens + n] = tail[:n]
    return out


def number_smoothing_loss(logits: torch.Tensor, labels: torch.Tensor, number_ids: torch.Tensor,
                          sigma: float) -> torch.Tensor:
    """Cross-entropy of the next-token distribution against a Gaussian (std `sigma` grid units) over
    the number tokens around each number label. `logits` [B, T, V] and `labels` [B, T] as the
    LM loss sees them (position t predicts label t+1)."""
    targets = labels[:, 1:]
    value_of = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    value_of[number_ids.to(logits.device)] = torch.arange(len(number_ids), device=logits.device)
    safe = targets.clamp(min=0)
    values = torch.where(targets >= 0, value_of[safe], torch.full_like(safe, -1))
    rows = values >= 0
    if not bool(rows.any()):
        return logits.new_zeros((), dtype=torch.float32)
    log_probs = F.log_softmax(logits[:, :-1][rows].float(), dim=-1)[:, number_ids.to(logits.device)]
    grid = torch.arange(len(number_ids), device=logits.device, dtype=torch.float32)
    weights = torch.softmax(-0.5 * ((grid[None, :] - values[rows].float()[:, None]) / sigma) ** 2, dim=-1)
    return -(weights * log_probs).sum(-1).mean()
