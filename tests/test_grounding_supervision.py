"""Conv vision tower, number tokens and the training-only grounding supervision
(ferret.model.vision_tower.ConvVisionTower, ferret.data.synthetic_tokenizer number tokens, ferret.training.grounding)."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ferret.model.configuration_ferret import FerretConfigError
from ferret.model.tiny import build_tiny_model
from ferret.model.vision_tower import ConvVisionConfig, ConvVisionTower
from ferret.data.synthetic_tokenizer import digit_token_ids, digit_twin, number_token_ids, train_bpe_tokenizer
from ferret.training.grounding import (
    AttentionSupervision,
    answer_box_spans,
    bracket_token_ids,
    init_number_rows,
    number_smoothing_loss,
    smooth_number_code,
    spliced_labels,
)


CONV = {"model_type": "ferret_conv_vision", "image_size": 48, "channels": [16, 32], "strides": [4, 3],
        "blocks_per_stage": 1, "norm_groups": 8}


@pytest.fixture(scope="module")
def number_tokenizer():
    from ferret.model.tiny import TINY_CORPUS

    return train_bpe_tokenizer(TINY_CORPUS * 4, vocab_size=400, number_tokens=True)


def conv_model(tokenizer, **overrides):
    model, _ = build_tiny_model(tokenizer, mm_vision_tower="embedded-conv", mm_hidden_size=32,
                                vision_config=CONV, **overrides)
    return model


# ------------------------------------------------------------------ conv tower


def test_conv_tower_grid_and_fp32_compute_under_bf16():
    config = ConvVisionConfig(image_size=48, channels=[16, 32], strides=[4, 3])
    tower = ConvVisionTower(config, frozen=False)
    assert (tower.grid_size, tower.num_patches, tower.hidden_size) == (4, 16, 32)
    pixels = torch.randn(2, 3, 48, 48)
    out32 = tower(pixels)
    assert out32.shape == (2, 16, 32) and out32.dtype == torch.float32
    tower.to(torch.bfloat16)
    out16 = tower(pixels)
    assert out16.dtype == torch.bfloat16
    out16.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in tower.parameters())
    with pytest.raises(ValueError, match=r"\[B, 3, 48, 48\]"):
        tower(torch.randn(1, 3, 32, 32))


def test_position_embedding_tells_the_cells_apart():
    """Without it a uniform image gives the same token in every interior cell (the convolutions
    are translation-equivariant), so a head copying a token copies no location; with it every
    cell differs, and the code starts smooth: neighbours are closer than far cells."""
    pixels = torch.full((1, 3, 96, 96), 0.3)
    plain = ConvVisionTower(ConvVisionConfig(image_size=96, channels=[16, 32], strides=[4, 3]), frozen=False)
    tokens = plain(pixels)[0].reshape(8, 8, 32)
    assert torch.allclose(tokens[3, 3], tokens[4, 4], atol=1e-5)  # beyond the zero padding's reach
    config = ConvVisionConfig(image_size=96, channels=[16, 32], strides=[4, 3], position_embedding=True)
    tower = ConvVisionTower(config, frozen=False)
    tokens = tower(pixels)[0]
    assert torch.cdist(tokens, tokens).fill_diagonal_(1.0).min() > 1e-3
    code = tower.position_embedding.detach().reshape(8, 8, 32)
    assert (code[0, 0] - code[0, 1]).norm() < (code[0, 0] - code[7, 7]).norm()
    tokens.sum().backward()
    assert tower.position_embedding.grad is not None


def test_conv_tower_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of the total stride"):
        ConvVisionConfig(image_size=50, channels=[16], strides=[4])
    with pytest.raises(ValueError, match="one entry per stage"):
        ConvVisionConfig(channels=[16, 32], strides=[4])
    with pytest.raises(FerretConfigError, match="conv tower"):
        build_tiny_model(mm_vision_tower="x", mm_hidden_size=32, vision_config={**CONV, "norm_groups": 5})


def test_conv_tower_keeps_pytorch_init_inside_the_model(tiny_tokenizer):
    # post_init would draw the convs N(0, initializer_range); the stem's fan-in (3 x 4 x 4) gives PyTorch's
    # default a std of 1 / sqrt(3 x 48) = 0.083
    model, _ = build_tiny_model(tiny_tokenizer, mm_vision_tower="embedded-conv", mm_hidden_size=32, vision_config=CONV)
    stem = model.model.vision_tower.stages[0][0][0].weight
    assert 0.06 < float(stem.detach().std()) < 0.11
    assert float(model.model.mm_projector.weight.detach().std()) == pytest.approx(model.config.initializer_range, rel=0.2)  # HF init elsewhere


@pytest.mark.parametrize("position_embedding", [False, True])
def test_conv_tower_model_round_trips_through_auto_classes(tmp_path, tiny_tokenizer, position_embedding):
    from transformers import AutoModelForCausalLM

    model, _ = build_tiny_model(tiny_tokenizer, mm_vision_tower="embedded-conv", mm_hidden_size=32,
                                vision_config={**CONV, "position_embedding": position_embedding})
    assert (model.model.vision_tower.position_embedding is not None) == position_embedding
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.model.vision_tower).__name__ == "ConvVisionTower"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6]])
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, images=pixels).logits, loaded(input_ids=ids, images=pixels).logits)


# ------------------------------------------------------------------ number tokens


def test_every_number_is_one_token_and_text_round_trips(number_tokenizer, tiny_tokenizer):
    ids = number_token_ids(number_tokenizer)
    assert ids is not None and len(set(ids)) == 1000
    rng = random.Random(0)
    for _ in range(300):
        box = [rng.randrange(1000) for _ in range(4)]
        text = f"The red circle [{box[0]}, {box[1]}, {box[2]}, {box[3]}]."
        encoded = number_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert [ids.index(i) for i in encoded if i in ids] == box
        assert number_tokenizer.decode(encoded) == text
    assert number_tokenizer.decode(number_tokenizer("size 1000x1000", add_special_tokens=False)["input_ids"]) == "size 1000x1000"
    assert number_token_ids(tiny_tokenizer) is None  # digits one by one


def test_digit_twin_is_the_digit_tokenizer_of_the_same_texts(number_tokenizer):
    # Requirement 2 of issue 13 compares digits with number tokens on one learned vocabulary.
    from ferret.model.tiny import TINY_CORPUS

    twin = digit_twin(number_tokenizer)
    built = train_bpe_tokenizer(TINY_CORPUS * 4, vocab_size=400, number_tokens=False)
    assert twin.backend_tokenizer.to_str() == built.backend_tokenizer.to_str()
    assert len(twin) == len(number_tokenizer) - 990 and number_token_ids(twin) is None
    text = "<image>\nWhat is <region_fea>? ASSISTANT: A blue square [230, 50, 330, 150].</s>"
    encoded = twin(text)["input_ids"]
    assert [twin.convert_ids_to_tokens(i) for i in encoded if i in digit_token_ids(twin)] == list("2305033015" "0")
    assert twin.decode(encoded[1:]) == text
    with pytest.raises(ValueError, match="one token per number"):
        digit_twin(twin)


def test_smooth_number_code_is_a_kernel_peaked_at_equal_values():
    code = smooth_number_code(torch.arange(1000), 256)
    similarity = code @ code[500]
    assert int(similarity.argmax()) == 500
    assert similarity[500] > similarity[505] > similarity[530] > similarity[700]


def test_init_number_rows_writes_the_code_into_both_embeddings(number_tokenizer):
    model = conv_model(number_tokenizer)
    ids = number_token_ids(number_tokenizer)
    init_number_rows(model, ids)
    rows = model.get_output_embeddings().weight[ids].detach()
    logits = rows @ rows[345]
    assert int(logits.argmax()) == 345 and logits[346] > logits[400]
    assert torch.allclose(model.get_input_embeddings().weight[ids].detach().norm(dim=-1),
                          model.get_input_embeddings().weight[ids][0].detach().norm(), atol=1e-4)


def test_number_smoothing_loss_prefers_near_misses():
    numbers = torch.arange(10, 1010)  # value v has id 10 + v
    labels = torch.full((1, 3), IGNORE_INDEX)
    labels[0, 1] = 10 + 500  # position 0 predicts the value 500
    near, far = torch.zeros(1, 3, 1010), torch.zeros(1, 3, 1010)
    near[0, 0, 10 + 503] = 10.0
    far[0, 0, 10 + 800] = 10.0
    assert number_smoothing_loss(near, labels, numbers, 4.0) < number_smoothing_loss(far, labels, numbers, 4.0)
    assert number_smoothing_loss(near, torch.full((1, 3), IGNORE_INDEX), numbers, 4.0) == 0


# ------------------------------------------------------------------ spans and splicing


def test_answer_box_spans_cover_the_bracket_contents(number_tokenizer):
    opens, closes = bracket_token_ids(number_tokenizer)
    text = "USER: where? ASSISTANT: A red circle [12, 30, 400, 999] and a blue star [1, 2, 3, 4]."
    ids = torch.tensor(number_tokenizer(text, add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    answer_start = len(number_tokenizer("USER: where? ASSISTANT:", add_special_tokens=False)["input_ids"])
    labels[:answer_start] = IGNORE_INDEX
    spans = answer_box_spans(ids, labels, opens, closes)
    assert len(spans) == 2
    pieces = [number_tokenizer.decode(ids[s:e]) for s, e in spans]
    assert pieces[0].strip() == "[12, 30, 400, 999" and pieces[1].strip() == "[1, 2, 3, 4"
    # a box in the question (not supervised) is no span; a box cut before its "]" neither
    labels[:] = IGNORE_INDEX
    assert answer_box_spans(ids, labels, opens, closes) == []
    cut = ids[: spans[1][0] + 3]
    assert len(answer_box_spans(cut, cut.clone(), opens, closes)) == 1


def test_spliced_labels_shift_the_text_after_the_image():
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 7, 8, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
    out = spliced_labels(ids, labels, num_image_tokens=3, width=7)
    assert out.tolist() == [[IGNORE_INDEX] * 4 + [7, 8, IGNORE_INDEX]]


# ------------------------------------------------------------------ attention supervision


def _batch(tokenizer, grid_cells):
    from ferret.conversation import tokenize_conversation

    messages = [("USER", "<image>\nWhere is the red circle?"), ("ASSISTANT", "A red circle [12, 30, 400, 999].")]
    ids, labels = tokenize_conversation(messages, tokenizer)
    cells = torch.zeros(1, grid_cells, dtype=torch.bool)
    cells[0, [5, 6]] = True
    ids, labels = torch.as_tensor(ids).reshape(1, -1), torch.as_tensor(labels).reshape(1, -1)
    return {"input_ids": ids, "labels": labels,
            "attention_mask": torch.ones_like(ids, dtype=torch.bool), "answer_cells": [cells]}


def test_attention_supervision_matches_the_model_attention(number_tokenizer):
    model = conv_model(number_tokenizer, attn_implementation="eager")
    supervision = AttentionSupervision(model, number_tokenizer, layer=1, head=2)
    batch = _batch(number_tokenizer, 16)
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], images=pixels,
                    output_attentions=True)
    loss = supervision.loss(batch)
    attention = out.attentions[1][0, 2]  # [T, T] of the supervised head
    p = int((batch["input_ids"][0] == IMAGE_TOKEN_INDEX).nonzero()[0])
    opens, closes = bracket_token_ids(number_tokenizer)
    (s, e), = answer_box_spans(batch["input_ids"][0], batch["labels"][0], opens, closes)
    queries = [j + 15 for j in range(s, e)]  # 16 image tokens replace 1 placeholder
    mass = attention[queries][:, [p + 5, p + 6]].sum(-1)
    torch.testing.assert_close(loss, -mass.log().mean(), rtol=1e-4, atol=1e-5)
    assert supervision.last_mass == pytest.approx(mass.mean().item(), rel=1e-4)


def test_attention_supervision_trains_the_head_onto_the_object(number_tokenizer):
    torch.manual_seed(0)
    model = conv_model(number_tokenizer)
    model.train()
    supervision = AttentionSupervision(model, number_tokenizer, layer=-1, head=0)
    batch = _batch(number_tokenizer, 16)
    pixels = torch.randn(1, 3, 48, 48)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    masses = []
    for _ in range(25):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], images=pixels,
              labels=batch["labels"])
        loss = supervision.loss(batch)
        masses.append(supervision.last_mass)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert masses[0] < 0.3 and masses[-1] > 0.8


def test_attention_supervision_rejects_a_bad_layer_or_head(number_tokenizer):
    model = conv_model(number_tokenizer)
    with pytest.raises(ValueError, match="layer 9"):
        AttentionSupervision(model, number_tokenizer, layer=9, head=0)
    with pytest.raises(ValueError, match="head 4"):
        AttentionSupervision(model, number_tokenizer, layer=0, head=4)


@pytest.mark.parametrize("absent_target", ["bos", "self"])
def test_presence_answers_are_supervised_onto_the_object_or_the_bos_sink(number_tokenizer, absent_target):
    # train.presence_absent_target: an absent name's query goes to BOS, or to its own position.
    from ferret.conversation import tokenize_conversation

    model = conv_model(number_tokenizer, attn_implementation="eager")
    supervision = AttentionSupervision(model, number_tokenizer, layer=0, head=1, absent_target=absent_target)
    messages = [("USER", "<image>\nIs there a red ring in the image?"), ("ASSISTANT", "No.")]
    ids, labels = tokenize_conversation(messages, number_tokenizer)
    ids, labels = torch.as_tensor(ids).reshape(1, -1), torch.as_tensor(labels).reshape(1, -1)
    presence = torch.zeros(1, 17, dtype=torch.bool)
    presence[0, 0] = True  # absent: the BOS sink
    batch = {"input_ids": ids, "labels": labels, "answer_cells": [torch.zeros(0, 16, dtype=torch.bool)],
             "presence_cells": [presence]}
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), output_attentions=True)
    loss = supervision.loss(batch)
    first_answer = int((labels[0] != IGNORE_INDEX).nonzero()[0])
    query = first_answer - 1 + 15  # after the 16 image tokens replaced the placeholder
    key = 0 if absent_target == "bos" else query
    torch.testing.assert_close(loss, -out.attentions[0][0, 1, query, key].log(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="absent target 'sink'"):
        AttentionSupervision(model, number_tokenizer, layer=0, head=1, absent_target="sink")


def test_presence_weight_scales_only_the_yes_no_query(number_tokenizer):
    # train.presence_supervision_weight: one "Yes"/"No" query shares the head with every box query;
    # the weight multiplies its term alone, and the mean is still over all queries.
    from ferret.training.config import TrainConfig
    from ferret.training.synthetic_world import grounding_supervision

    model = conv_model(number_tokenizer, attn_implementation="eager")
    batch = _batch(number_tokenizer, 16)
    presence = torch.zeros(1, 17, dtype=torch.bool)
    presence[0, 0] = True  # the first answer read as an absent "No": the BOS sink
    batch["presence_cells"] = [presence]
    cfg = TrainConfig()
    cfg.train.attention_supervision_weight, cfg.train.attention_supervision_layer = 1.0, 1
    plain, = grounding_supervision(model, number_tokenizer, cfg)[0]
    cfg.train.presence_supervision_weight = 4.0
    weighted, = grounding_supervision(model, number_tokenizer, cfg)[0]
    queries = plain._queries(batch, 0)
    assert [w for *_, w in weighted._queries(batch, 0)] == [1.0] * (len(queries) - 1) + [4.0]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], images=torch.randn(1, 3, 48, 48), output_attentions=True)
    losses = [s.loss(batch) for s in (plain, weighted)]  # both read the one captured forward
    yes_no = -out.attentions[1][0, 0, queries[-1][0] + 15, 0].log()  # 16 image tokens replace 1 placeholder
    torch.testing.assert_close(losses[1] - losses[0], 3.0 * yes_no / len(queries), rtol=1e-4, atol=1e-5)


def test_presence_targets_from_the_question(tmp_path):
    import numpy as np

    from ferret.training.scene_targets import presence_targets
    from ferret.data.rle import encode_rle
    from ferret.training.dense_supervision import ScenePatchTargets

    mask = np.zeros((40, 40), dtype=bool)
    mask[0:20, 0:20] = True
    record = {"scene_id": 3, "width": 40, "height": 40, "objects": [
        {"name": "red circle", "color": "red", "shape": "circle", "box": [0, 0, 19, 19], "mask": encode_rle(mask)}]}
    targets = ScenePatchTargets([record], grid=2)
    sample = {"scene_id": 3, "conversations": [
        {"from": "human", "value": "<image>\\nIs there a red circle in the image?"}, {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "Is there a blue star in the image?"}, {"from": "gpt", "value": "No."},
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red circle."}]}
    out = presence_targets(sample, targets)
    assert out.tolist() == [[False, True, False, False, False], [True, False, False, False, False], [False] * 5]


def test_presence_can_live_on_another_layers_head(number_tokenizer):
    # train.presence_supervision_*: the box head(s) stop supervising "Yes"/"No", a second head does
    # (with coordinate heads, head 0 of their layer is also the x1 head and never learned presence).
    from ferret.training.config import TrainConfig, TrainConfigError
    from ferret.training.synthetic_world import grounding_supervision

    model = conv_model(number_tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    batch = _batch(number_tokenizer, 16)
    presence = torch.zeros(1, 17, dtype=torch.bool)
    presence[0, 3] = True  # the asked object's cell
    batch["presence_cells"] = [presence]
    cfg = TrainConfig()
    cfg.train.attention_supervision_weight = 1.0
    cfg.train.attention_supervision_layer = 1
    cfg.train.attention_supervision_coordinate_heads = True
    together, _ = grounding_supervision(model, number_tokenizer, cfg)
    assert len(together) == 1 and len(together[0]._queries(batch, 0)) == 16 + 1  # 4 numbers x 4 heads + "Yes"
    cfg.train.presence_supervision_layer, cfg.train.presence_supervision_head = 0, 2
    boxes, apart = grounding_supervision(model, number_tokenizer, cfg)[0]
    assert len(boxes._queries(batch, 0)) == 16
    *box_positions, (position, head, target, words, weight) = apart._queries(batch, 0)
    assert apart.attention is model.model.layers[0].self_attn and head == 2 and target.equal(presence[0]) and words == () and weight == 1.0
    # It also finds the box's object from every box position (as one head, not per coordinate).
    (start, end), = answer_box_spans(batch["input_ids"][0], batch["labels"][0], *bracket_token_ids(number_tokenizer))
    assert [j for j, *_ in box_positions] == list(range(start, end))
    assert all(h == 2 and t[1:].any() and w == 1.0 for _, h, t, _, w in box_positions)
    with pytest.raises(TrainConfigError, match="presence_supervision_layer/head.*head 7"):
        cfg.train.presence_supervision_head = 7
        grounding_supervision(model, number_tokenizer, cfg)


def _absent_red_ring_batch(tokenizer, first_turn: tuple[str, str], boxes: int = 0):
    """(ids [1, T], labels [1, T], batch) of one sample on a 4x4 grid: `first_turn` (question,
    answer) about the image, then "Is there a red ring in the image?" "No." (the BOS sink)."""
    from ferret.conversation import tokenize_conversation

    question, answer = first_turn
    messages = [("USER", "<image>\n" + question), ("ASSISTANT", answer),
                ("USER", "Is there a red ring in the image?"), ("ASSISTANT", "No.")]
    ids, labels = tokenize_conversation(messages, tokenizer)
    ids, labels = torch.as_tensor(ids).reshape(1, -1), torch.as_tensor(labels).reshape(1, -1)
    presence = torch.zeros(2, 17, dtype=torch.bool)
    presence[1, 0] = True  # the second turn asks "Is there ...?" (absent: the BOS sink)
    return ids, labels, {"input_ids": ids, "labels": labels, "answer_cells": [torch.zeros(boxes, 16, dtype=torch.bool)],
                         "presence_cells": [presence]}


def _name_layer_setup(first_turn: tuple[str, str], boxes: int = 0):
    """(tokenizer, eager 4-head model, (ids, labels, batch) of _absent_red_ring_batch, a config whose
    box head is layer 1 head 0) for the name-layer supervision tests. The shipped tokenizer: colour
    and shape names are single tokens, and each number 0-999 is one."""
    from transformers import AutoTokenizer

    from ferret.training.config import TrainConfig

    tokenizer = AutoTokenizer.from_pretrained("ferret/assets/model")
    model = conv_model(tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                       attn_implementation="eager")
    cfg = TrainConfig()
    cfg.train.attention_supervision_weight = 1.0
    cfg.train.attention_supervision_layer = 1
    return tokenizer, model, _absent_red_ring_batch(tokenizer, first_turn, boxes=boxes), cfg


def test_name_head_is_supervised_onto_the_asked_colour_and_shape_words():
    # train.name_supervision_*: from the position that writes "Yes"/"No", a head of an earlier layer
    # looks at the question's colour and shape words (the position-code runs' presence head could
    # not tell what was asked: bench/probes/README.md, session 8).
    from ferret.training.config import TrainConfigError
    from ferret.training.grounding import asked_name_positions
    from ferret.training.synthetic_world import grounding_supervision

    tokenizer, model, (ids, labels, batch), cfg = _name_layer_setup(
        ("What is the blue cross <bbox_location0>?", "A blue cross."))
    cfg.train.name_supervision_layer, cfg.train.name_supervision_head = 0, 3
    box_head, name_head = grounding_supervision(model, tokenizer, cfg)[0]
    (position, head, target, words, _), = name_head._queries(batch, 0)
    starts = [j for j in range(1, ids.shape[1]) if labels[0, j] != IGNORE_INDEX and labels[0, j - 1] == IGNORE_INDEX]
    assert position == starts[-1] - 1 and head == 3 and not target.any()  # the position that writes "No"
    assert tokenizer.convert_ids_to_tokens(ids[0, list(words)].tolist()) == ["\u2581red", "\u2581ring"]
    assert words == asked_name_positions(ids[0], starts[-1], name_head.name_ids)
    assert len(box_head._queries(batch, 0)) == 1  # the presence query stays on the box head
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), output_attentions=True)
    loss = name_head.loss(batch)
    spliced = [j + 15 for j in words]  # after the 16 image tokens replaced the placeholder
    expected = -out.attentions[0][0, 3, position + 15, spliced].sum().log()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    # train.name_supervision_each_word: one query per word, so the loss is the mean of the two
    # words' -log(attention) and the head cannot meet it by looking at the shape word alone.
    cfg.train.name_supervision_each_word = True
    _, each_head = grounding_supervision(model, tokenizer, cfg)[0]
    assert [(p, h, w) for p, h, _, w, _ in each_head._queries(batch, 0)] == [(position, 3, (j,)) for j in words]
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), output_attentions=True)
    per_word = -out.attentions[0][0, 3, position + 15, spliced].log()
    torch.testing.assert_close(each_head.loss(batch), per_word.mean(), rtol=1e-4, atol=1e-5)
    with pytest.raises(TrainConfigError, match="name_supervision_layer/head"):
        cfg.train.name_supervision_layer = 9
        grounding_supervision(model, tokenizer, cfg)


def test_colour_head_reads_the_asked_colour_word_alone_from_the_yes_no_position():
    # train.name_supervision_colour_head: another head of the name layer looks, from the position
    # that writes "Yes"/"No", at the asked colour word only (one query a yes/no answer).
    from ferret.training.config import TrainConfigError
    from ferret.training.synthetic_world import grounding_supervision

    tokenizer, model, (ids, labels, batch), cfg = _name_layer_setup(
        ("What is the blue cross <bbox_location0>?", "A blue cross."))
    cfg.train.name_supervision_layer, cfg.train.name_supervision_head = 0, 1
    cfg.train.name_supervision_colour_head = 3
    _, name_head, colour_head = grounding_supervision(model, tokenizer, cfg)[0]
    (position, _, _, _, _), = name_head._queries(batch, 0)
    (colour_position, head, target, words, weight), = colour_head._queries(batch, 0)
    assert (colour_position, head, weight) == (position, 3, 1.0) and not target.any()
    assert tokenizer.convert_ids_to_tokens(ids[0, list(words)].tolist()) == ["\u2581red"]
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), output_attentions=True)
    expected = -out.attentions[0][0, 3, position + 15, words[0] + 15].log()
    torch.testing.assert_close(colour_head.loss(batch), expected, rtol=1e-4, atol=1e-5)
    cfg.data.scene_records, cfg.data.data_path, cfg.model.tiny = "scenes_train.json", ["train.json"], True
    cfg.validate()
    cfg.train.name_supervision_colour_head = 1
    with pytest.raises(TrainConfigError, match="name_supervision_colour_head: the name head itself"):
        cfg.validate()
    cfg.train.name_supervision_colour_head, cfg.train.name_supervision_layer = 3, None
    with pytest.raises(TrainConfigError, match="name_supervision_colour_head"):
        cfg.validate()


def test_name_copy_points_each_restated_word_at_its_question_word():
    # train.name_supervision_copy: the answer's restated name ("The pink cross [...]") is copied
    # from the question; only turns whose question names one object (not the two-way choice).
    from transformers import AutoTokenizer

    from ferret.conversation import tokenize_conversation
    from ferret.training.config import TrainConfig, TrainConfigError
    from ferret.training.grounding import name_copy_queries
    from ferret.training.synthetic_world import grounding_supervision

    tokenizer = AutoTokenizer.from_pretrained("ferret/assets/model")
    messages = [("USER", "<image>\nWhere is the pink cross?"), ("ASSISTANT", "The pink cross [10, 20, 30, 40]."),
                ("USER", "Is the object <bbox_location0> of the image a blue ring or a green cross?"),
                ("ASSISTANT", "A green cross."),
                ("USER", "Is there a red ring in the image?"), ("ASSISTANT", "Yes, the red ring [1, 2, 3, 4].")]
    ids, labels = tokenize_conversation(messages, tokenizer)
    ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
    cfg = TrainConfig()
    cfg.train.attention_supervision_weight = 1.0
    cfg.train.attention_supervision_layer = 1
    cfg.train.name_supervision_layer, cfg.train.name_supervision_head = 0, 3
    cfg.train.name_supervision_copy = True
    model = conv_model(tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    name_head = grounding_supervision(model, tokenizer, cfg)[0][1]
    queries = name_copy_queries(ids, labels, name_head.name_words)
    words = lambda positions: tokenizer.convert_ids_to_tokens(ids[list(positions)].tolist())
    # (what the query position writes next, the question word it is pointed at), in order
    seen = [(words([j + 1]), words(at)) for j, at in queries]
    # (the question's "cross?" is one token: the mark glued on)
    assert seen == [(["\u2581pink"], ["\u2581pink"]), (["\u2581cross"], ["\u2581cross?"]),
                    (["\u2581red"], ["\u2581red"]), (["\u2581ring"], ["\u2581ring"])]
    assert all(labels[j + 1] != IGNORE_INDEX and labels[a] == IGNORE_INDEX for j, at in queries for a in at)
    batch = {"input_ids": ids[None], "labels": labels[None], "answer_cells": [torch.zeros(0, 16, dtype=torch.bool)]}
    copy = [(p, w) for p, _, t, w, _ in name_head._queries(batch, 0) if not t.any()]
    assert copy == queries
    cfg.train.name_supervision_copy = False
    assert grounding_supervision(model, tokenizer, cfg)[0][1]._queries(batch, 0) == []
    # train.name_supervision_copy_steps: the copy only in the stage's first N steps
    from ferret.training.synthetic_world import SyntheticWorldSupervision

    cfg.train.name_supervision_copy, cfg.train.name_supervision_copy_steps = True, 4
    cfg.train.dense_loss_weight = 0.0
    aux = SyntheticWorldSupervision(model, tokenizer, cfg)
    name_head = aux.attention[1]
    for step, copying in [(0, True), (3, True), (4, False), (900, False)]:
        # (a batch without answer cells: the toggle alone, no attention loss to compute)
        aux.add_losses(torch.zeros(()), {"input_ids": ids[None]}, None, torch.device("cpu"), step)
        assert name_head.name_copy is copying and aux.attention[0].name_copy is False
        assert bool([q for q in name_head._queries(batch, 0) if not q[2].any()]) is copying
    cfg.data.scene_records, cfg.data.data_path, cfg.model.tiny = "scenes_train.json", ["train.json"], True
    cfg.validate()
    cfg.train.name_supervision_copy = False
    with pytest.raises(TrainConfigError, match="name_supervision_copy_steps"):
        cfg.validate()
    cfg.train.name_supervision_copy, cfg.train.name_supervision_copy_steps = True, 0
    with pytest.raises(TrainConfigError, match="name_supervision_copy_steps"):
        cfg.validate()
    cfg.train.name_supervision_copy_steps = None
    cfg.train.name_supervision_copy, cfg.train.name_supervision_layer = True, None
    with pytest.raises(TrainConfigError, match="name_supervision_copy"):
        cfg.validate()


def test_box_name_reads_point_each_number_position_at_the_box_colour_and_shape():
    # train.name_supervision_boxes: from each position that writes a box's number, the name head
    # looks at the box's colour word and at its shape word (one query each), in a term of its own.
    from ferret.training.config import TrainConfigError
    from ferret.training.synthetic_world import grounding_supervision

    tokenizer, model, (ids, labels, batch), cfg = _name_layer_setup(
        ("Where is the pink cross?", "The pink cross [10, 20, 30, 40]."), boxes=1)
    cfg.train.name_supervision_layer, cfg.train.name_supervision_head = 0, 3
    assert len(grounding_supervision(model, tokenizer, cfg)[0]) == 2
    cfg.train.name_supervision_boxes = True
    _, name_head, box_names = grounding_supervision(model, tokenizer, cfg)[0]
    queries = box_names._queries(batch, 0)
    tokens = lambda positions: tokenizer.convert_ids_to_tokens(ids[0, list(positions)].tolist())
    # (what the query position writes next, the word it is pointed at): both words from each of the 4
    assert [(tokens([j + 1]), tokens(w)) for j, _, _, w, _ in queries] == [
        ([number], [word]) for number in ("10", "20", "30", "40") for word in ("\u2581pink", "\u2581cross")]
    assert all(h == 3 and not t.any() and w == 1.0 for _, h, t, _, w in queries)
    assert len(name_head._queries(batch, 0)) == 1  # the yes/no read stays on the name term alone
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), output_attentions=True)
    expected = torch.stack([-out.attentions[0][0, 3, j + 15, w[0] + 15].log() for j, _, _, w, _ in queries]).mean()
    torch.testing.assert_close(box_names.loss(batch), expected, rtol=1e-4, atol=1e-5)
    cfg.data.scene_records, cfg.data.data_path, cfg.model.tiny = "scenes_train.json", ["train.json"], True
    cfg.validate()
    # train.name_supervision_boxes_steps: the box name reads in the stage's first N steps only
    from ferret.training.synthetic_world import SyntheticWorldSupervision

    cfg.train.name_supervision_boxes_steps, cfg.train.dense_loss_weight = 4, 0.0
    cfg.validate()
    aux = SyntheticWorldSupervision(model, tokenizer, cfg)
    box_names = aux.attention[-1]
    for step, reading in [(0, True), (3, True), (4, False), (900, False)]:
        aux.add_losses(torch.zeros(()), {"input_ids": ids}, None, torch.device("cpu"), step)
        assert box_names.name_boxes is reading and not aux.attention[1].name_boxes
        assert len(box_names._queries(batch, 0)) == (8 if reading else 0)
        assert len(aux.attention[1]._queries(batch, 0)) == 1  # the yes/no read goes on
    cfg.train.name_supervision_boxes_steps = 0
    with pytest.raises(TrainConfigError, match="name_supervision_boxes_steps"):
        cfg.validate()
    cfg.train.name_supervision_boxes_steps = None
    # train.name_supervision_boxes_layer/head: the same reads on a head of their own, the name head
    # keeping its yes/no read alone.
    cfg.train.name_supervision_boxes_layer, cfg.train.name_supervision_boxes_head = 1, 2
    _, name_head, box_names = grounding_supervision(model, tokenizer, cfg)[0]
    assert box_names.attention is model.model.layers[1].self_attn and box_names.head == 2
    assert [(j, w) for j, h, _, w, _ in box_names._queries(batch, 0) if h == 2] == [(j, w) for j, _, _, w, _ in queries]
    assert len(name_head._queries(batch, 0)) == 1
    cfg.validate()
    cfg.train.name_supervision_layer = None  # not needed once the box reads have their own head
    assert len(grounding_supervision(model, tokenizer, cfg)[0]) == 2
    cfg.validate()
    cfg.train.name_supervision_boxes_head = 4
    with pytest.raises(TrainConfigError, match="name_supervision_boxes.*head 4 outside"):
        grounding_supervision(model, tokenizer, cfg)
    cfg.train.name_supervision_boxes_layer = None
    with pytest.raises(TrainConfigError, match="name_supervision_boxes"):
        cfg.validate()
    cfg.train.name_supervision_boxes, cfg.train.name_supervision_boxes_layer = False, 1
    with pytest.raises(TrainConfigError, match="name_supervision_boxes_layer"):
        cfg.validate()
    cfg.train.name_supervision_boxes_layer, cfg.train.name_supervision_boxes_steps = None, 700
    with pytest.raises(TrainConfigError, match="name_supervision_boxes_steps"):
        cfg.validate()


def test_coordinate_heads_split_the_box_numbers_over_four_heads(number_tokenizer):
    model = conv_model(number_tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                       attn_implementation="eager")
    supervision = AttentionSupervision(model, number_tokenizer, layer=1, head=0, coordinate_heads=True)
    batch = _batch(number_tokenizer, 16)
    queries = supervision._queries(batch, 0)
    assert len(queries) == 16  # 4 number positions x 4 heads
    ids = batch["input_ids"][0].tolist()
    numbers = [ids[j + 1] for j, h, *_ in queries if h == 0]
    assert [number_token_ids(number_tokenizer).index(n) for n in numbers] == [12, 30, 400, 999]
    for k, (j, h, target, _, _) in enumerate(queries):
        on_object = bool(target[1:].any())
        assert on_object == (h == k // 4) and bool(target[0]) == (not on_object)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], images=torch.randn(1, 3, 48, 48), output_attentions=True)
    assert torch.isfinite(supervision.loss(batch))
    # Each head's own mass on the object, from its own number's position (the log's per-head masses).
    p = int((batch["input_ids"][0] == IMAGE_TOKEN_INDEX).nonzero()[0])
    n_image = supervision.num_image_tokens
    expected = {}
    for k, (j, h, target, _, _) in enumerate(queries):
        if target[1:].any():
            row = out.attentions[1][0, h, j + n_image - 1, p:p + n_image]
            expected[h] = row[target[1:]].sum().item()
    assert sorted(supervision.last_head_mass) == [0, 1, 2, 3]
    for h, mass in expected.items():
        assert supervision.last_head_mass[h] == pytest.approx(mass, rel=1e-4)
    assert supervision.last_mass == pytest.approx(sum(expected.values()) / 4, rel=1e-4)


def test_step_metrics_log_each_coordinate_heads_mass(number_tokenizer):
    # The mean of the four heads hid one head binding late (session 29); the log has each one.
    from ferret.training.config import TrainConfig
    from ferret.training.synthetic_world import SyntheticWorldSupervision

    model = conv_model(number_tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    cfg = TrainConfig()
    cfg.train.attention_supervision_weight, cfg.train.attention_supervision_layer = 1.0, 1
    cfg.train.attention_supervision_coordinate_heads = True
    aux = SyntheticWorldSupervision(model, number_tokenizer, cfg)
    batch = _batch(number_tokenizer, 16)
    heads = []
    for _ in range(2):
        with torch.no_grad():
            model(input_ids=batch["input_ids"], images=torch.randn(1, 3, 48, 48))
        aux.add_losses(torch.zeros(()), batch, None, torch.device("cpu"), 0)
        heads.append(dict(aux.attention[0].last_head_mass))
    record = aux.step_metrics(1, torch.device("cpu"))
    for h in range(4):
        assert record[f"attention_mass_head{h}"] == pytest.approx((heads[0][h] + heads[1][h]) / 2)
    assert record["attention_mass"] == pytest.approx(sum(record[f"attention_mass_head{h}"] for h in range(4)) / 4)
    line = SyntheticWorldSupervision.describe(record)
    assert line.endswith("(" + "/".join(f"{record[f'attention_mass_head{h}']:.2f}" for h in range(4)) + ")")


def test_coordinate_heads_with_digits_supervise_every_digit_of_the_number(tiny_tokenizer):
    # A digit tokenizer writes "400" in three steps: head c looks at the object from each of them.
    model = conv_model(tiny_tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    supervision = AttentionSupervision(model, tiny_tokenizer, layer=1, head=0, coordinate_heads=True)
    batch = _batch(tiny_tokenizer, 16)
    queries = supervision._queries(batch, 0)
    ids = batch["input_ids"][0].tolist()
    digits = digit_token_ids(tiny_tokenizer)
    on_object = {c: "".join(str(digits.index(ids[j + 1])) for j, h, t, *_ in queries if h == c and t[1:].any())
                 for c in range(4)}
    assert on_object == {0: "12", 1: "30", 2: "400", 3: "999"}
    assert len(queries) == 4 * (2 + 2 + 3 + 3)
    assert all(bool(t[0]) != bool(t[1:].any()) for _, _, t, _, _ in queries)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], images=torch.randn(1, 3, 48, 48))
    assert torch.isfinite(supervision.loss(batch))
    # The training config accepts it; the box code and the smooth rows still need number tokens.
    from ferret.training.config import TrainConfig, TrainConfigError
    from ferret.training.synthetic_world import grounding_supervision

    cfg = TrainConfig()
    cfg.train.attention_supervision_weight, cfg.train.attention_supervision_layer = 1.0, 1
    cfg.train.attention_supervision_coordinate_heads = True
    heads, numbers = grounding_supervision(model, tiny_tokenizer, cfg)
    assert len(heads) == 1 and heads[0].coordinate_heads and numbers is None
    for key, value in (("box_code_weight", 0.25), ("init_number_rows", True)):
        wrong = copy.deepcopy(cfg)
        setattr(wrong.train, key, value)
        with pytest.raises(TrainConfigError, match="one token"):
            grounding_supervision(model, tiny_tokenizer, wrong)


def test_init_coordinate_heads_copies_block_c_through_head_c(number_tokenizer):
    from ferret.training.grounding import init_coordinate_heads

    model = conv_model(number_tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    init_coordinate_heads(model, 1)
    attention = model.model.layers[1].self_attn
    x = torch.randn(64)
    assert torch.allclose(attention.o_proj(attention.v_proj(x)), x, atol=1e-6)
    with pytest.raises(ValueError, match="head_dim"):
        init_coordinate_heads(conv_model(number_tokenizer, hidden_size=64, num_attention_heads=2,
                                         num_key_value_heads=2), 0)


def test_a_pretrained_model_keeps_its_number_rows_and_coordinate_heads(number_tokenizer):
    # Fine-tuning from model.pretrained must not restart what the first run learnt.
    from ferret.training.config import TrainConfig
    from ferret.training.synthetic_world import grounding_supervision

    cfg = TrainConfig()
    cfg.train.attention_supervision_weight, cfg.train.attention_supervision_layer = 1.0, 1
    cfg.train.attention_supervision_coordinate_heads, cfg.train.init_number_rows = True, True
    for pretrained, kept in ((None, False), ("checkpoints/run/hf", True)):
        model = conv_model(number_tokenizer, hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
        before = [p.detach().clone() for p in (model.model.layers[1].self_attn.v_proj.weight, model.model.embed_tokens.weight)]
        cfg.model.pretrained = pretrained
        grounding_supervision(model, number_tokenizer, cfg)
        after = (model.model.layers[1].self_attn.v_proj.weight, model.model.embed_tokens.weight)
        assert [b.equal(a) for b, a in zip(before, after)] == [kept, kept]


def test_box_code_loss_is_low_when_each_block_holds_its_coordinate():
    from ferret.training.grounding import box_code_loss

    rows = torch.cat([smooth_number_code(torch.arange(1000), 64)] * 4, dim=-1)  # [1000, 256], as at hidden 256
    box = torch.tensor([[[100, 250, 600, 900]]])
    covered = torch.tensor([[True]])
    right = torch.cat([smooth_number_code(box[0, 0, c:c + 1], 64) for c in range(4)], dim=-1) * 8
    wrong = torch.cat([smooth_number_code(torch.tensor([500]), 64)] * 4, dim=-1) * 8
    assert box_code_loss(right[None], box, covered, rows, 6.0) < box_code_loss(wrong[None], box, covered, rows, 6.0)
    assert box_code_loss(right[None], box, torch.tensor([[False]]), rows, 6.0) == 0
    # the rows are read at unit norm: rows of the embeddings' initial scale give the same loss
    assert torch.allclose(box_code_loss(right[None], box, covered, rows * 0.05, 6.0),
                          box_code_loss(right[None], box, covered, rows, 6.0), atol=1e-5)
    # a block of norm 8 (what the final RMSNorm hands the LM head) holding the right code is sharp:
    # near the Gaussian target's own entropy (3.2 nats for std 6); the same code at the norm the
    # projector starts with (~0.3) reads nearly flat (ln 1000 = 6.9)
    assert box_code_loss(right[None], box, covered, rows, 6.0) < 4.0
    assert box_code_loss(right[None] * 0.3 / 8, box, covered, rows, 6.0) > 6.5


def test_coordinate_block_rows_have_unit_norm_per_block(number_tokenizer):
    model = conv_model(number_tokenizer)
    ids = number_token_ids(number_tokenizer)
    init_number_rows(model, ids, blocks=4)
    rows = model.get_output_embeddings().weight[ids].detach()
    blocks = rows.view(len(ids), 4, -1)
    assert torch.allclose(blocks.norm(dim=-1), torch.ones(len(ids), 4), atol=1e-4)
    assert torch.equal(blocks[:, 0], blocks[:, 3])  # the same code in every coordinate block


# ------------------------------------------------------------------ vision warm-up


def test_warm_up_region_readout_trains_the_sampler_but_not_the_tower(tmp_path):
    # The region readout's gradient through the sampled points slowed the tower's shape learning
    # 2x (bench/probes/README.md): in the warm-up it reads the tower's features detached.
    import numpy as np
    from transformers import AutoTokenizer

    from ferret.data.rle import encode_rle
    from ferret.training.config import TrainConfig
    from ferret.training.dense_supervision import ScenePatchTargets
    from ferret.training.synthetic_world import DenseReadout, WarmUpStep

    tokenizer = AutoTokenizer.from_pretrained("ferret/assets/model")  # colour and shape names are single tokens
    model = conv_model(tokenizer, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                       region_geo_sampler=True, sampler_num_init_point=32, sampler_num_sub_point=[16, 8],
                       sampler_num_neighbor=[4, 4])
    readout = DenseReadout(model, tokenizer)

    def record(scene_id, color, shape):
        mask = np.zeros((40, 50), dtype=bool)
        mask[8:30, 10:40] = True
        return {"scene_id": scene_id, "width": 50, "height": 40, "image": f"{scene_id}.png",
                "objects": [{"name": f"{color} {shape}", "color": color, "shape": shape, "box": [10, 8, 39, 29],
                             "mask": encode_rle(mask)}]}

    records = [record(0, "red", "square"), record(1, "blue", "circle")]
    cfg = TrainConfig()
    cfg.train.per_device_batch_size = 2
    cfg.data.scene_records = str(tmp_path / "scenes_train.json")
    targets = ScenePatchTargets(records, grid=model.get_vision_tower().grid_size)
    step = WarmUpStep(model, readout, targets, None, cfg, rank=0, world=1, device=torch.device("cpu"))
    features = torch.randn(2, model.get_vision_tower().num_patches, 32, requires_grad=True)
    loss = step.region_loss(features, records, step=0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert features.grad is None  # the tower gets nothing from it
    sampler_grads = [p.grad for p in model.model.region_geo_sampler.parameters() if p.grad is not None]
    assert sampler_grads and any(float(g.abs().sum()) > 0 for g in sampler_grads)


def test_region_box_code_reads_each_regions_object_box_off_its_embedding():
    # train.region_box_code_weight: the image tokens' box code also on each referred region's
    # embedding, for the object it overlaps most; a region on the background has no box to read.
    from transformers import AutoTokenizer

    from ferret.data.synthetic_tokenizer import number_token_ids
    from ferret.training.grounding import box_code_loss
    from ferret.training.synthetic_world import DenseReadout

    tokenizer = AutoTokenizer.from_pretrained("ferret/assets/model")  # one token per number 0-999
    model = conv_model(tokenizer, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                       region_geo_sampler=True, sampler_num_init_point=32, sampler_num_sub_point=[16, 8],
                       sampler_num_neighbor=[4, 4])
    readout = DenseReadout(model, tokenizer)
    ids = torch.tensor(number_token_ids(tokenizer))
    readout.box_code = (ids, 0.25, 6.0)
    cells = model.get_vision_tower().num_patches
    tokens = torch.randn(1, cells, 64)
    regions = torch.randn(2, 64, requires_grad=True)
    batch = {"patch_color": torch.zeros(1, cells, dtype=torch.long), "patch_shape": torch.zeros(1, cells, dtype=torch.long),
             "patch_box": torch.zeros(1, cells, 4, dtype=torch.long),
             "region_color": [torch.tensor([3, 0])], "region_shape": [torch.tensor([2, 0])],
             "region_box": [torch.tensor([[100, 200, 300, 400], [0, 0, 0, 0]])]}

    def loss(weight):
        readout.region_box_code_weight = weight
        readout.tokens, readout.regions = tokens, [regions]
        return readout.loss(batch, torch.device("cpu"))

    rows = model.get_output_embeddings().weight[ids]
    expected = box_code_loss(regions[:1].unsqueeze(0), torch.tensor([[[100, 200, 300, 400]]]),
                             torch.tensor([[True]]), rows, 6.0)
    torch.testing.assert_close(loss(2.0) - loss(0.0), 2.0 * expected, rtol=1e-4, atol=1e-5)
    regions.grad = None
    loss(2.0).backward()
    assert regions.grad[0].abs().sum() > 0
    base = regions.grad.clone()
    regions.grad = None
    loss(0.0).backward()
    assert torch.allclose(regions.grad[1], base[1])  # the background region: the box code adds nothing


def test_region_box_code_needs_the_box_code():
    from ferret.training.config import TrainConfig, TrainConfigError

    cfg = TrainConfig()
    cfg.model.tiny, cfg.data.data_path, cfg.data.scene_records = True, ["train.json"], "scenes_train.json"
    cfg.train.dense_loss_weight, cfg.train.region_box_code_weight = 1.0, 0.5
    with pytest.raises(TrainConfigError, match="region_box_code_weight.*box_code_weight"):
        cfg.validate()
    cfg.train.box_code_weight = 0.25
    cfg.validate()
    cfg.train.region_box_code_weight = -1.0
    with pytest.raises(TrainConfigError, match="region_box_code_weight"):
        cfg.validate()


def test_answer_box_cells_are_the_best_overlapping_objects_cells():
    # The attention targets: each answer box's object (the one whose box overlaps it most), its
    # cells covered >= min_cover, else its single most covered cell; cached per object.
    import numpy as np

    from ferret.data.rle import encode_rle
    from ferret.training.dense_supervision import ScenePatchTargets

    big, tiny = np.zeros((40, 40), dtype=bool), np.zeros((40, 40), dtype=bool)
    big[0:20, 0:20] = True
    tiny[30:32, 22:24] = True  # 4 px of a 400 px cell: under min_cover
    record = {"scene_id": 5, "width": 40, "height": 40, "objects": [
        {"name": "red circle", "box": [0, 0, 19, 19], "mask": encode_rle(big)},
        {"name": "blue star", "box": [22, 30, 23, 31], "mask": encode_rle(tiny)}]}
    targets = ScenePatchTargets([record], grid=2)
    expected = [[True, False, False, False], [False, False, False, True]]
    assert targets.answer_box_cells(5, [[1, 1, 18, 20], [21, 29, 24, 32]]).tolist() == expected
    again = targets.answer_box_cells("5", [[21, 29, 24, 32], [0, 0, 19, 19]])
    assert again.tolist() == expected[::-1]
    again[0] = True  # the caller's rows are its own, not the cache
    assert targets.object_cells(5, "blue star").tolist() == expected[1]
    assert targets.object_cells(5, "green ring") is None


def test_box_name_readout_reads_each_box_name_at_its_number_positions():
    # train.box_name_readout_weight: each answer box's colour and shape are read, on the names' word
    # embeddings, from the input (after the norm) of the box heads' layer at the positions that
    # write its numbers; the loss is class_logits' cross-entropy there, and gradients reach the layers below.
    from ferret.training.config import TrainConfigError
    from ferret.training.dense_supervision import DenseVocabulary, NameDirections, class_logits
    from ferret.training.synthetic_world import SyntheticWorldSupervision

    tokenizer, model, (ids, labels, batch), cfg = _name_layer_setup(
        ("Where is the pink cross?", "The pink cross [10, 20, 30, 40]."), boxes=1)
    cfg.train.dense_loss_weight, cfg.train.box_name_readout_weight = 0.0, 0.5
    cfg.train.attention_supervision_weight = 0.0  # the readout alone (its layer: the box heads', 1)
    aux = SyntheticWorldSupervision(model, tokenizer, cfg)
    readout = aux.name_readouts["box_name"][0]
    found = readout.queries(ids[0], labels[0])
    tokens = lambda positions: tokenizer.convert_ids_to_tokens(ids[0, list(positions)].tolist())
    assert [tokens([j + 1])[0] for j, _, _ in found] == ["10", "20", "30", "40"]
    colours, shapes = NameDirections.token_ids(tokenizer, DenseVocabulary.synthetic())
    assert {(c, s) for _, c, s in found} == {(1 + colours.index(tokenizer.convert_tokens_to_ids("\u2581pink")),
                                             1 + shapes.index(tokenizer.convert_tokens_to_ids("\u2581cross")))}
    captured = {}
    layer = model.model.layers[1]
    hook = layer.input_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("normed", o))
    out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), labels=labels)
    hook.remove()
    total = aux.add_losses(out.loss, batch, out, torch.device("cpu"), 0)
    vectors = captured["normed"][0, [j + 15 for j, _, _ in found]]  # 16 image tokens for the placeholder
    colour_logits, shape_logits = class_logits(vectors, NameDirections.from_embeddings(
        model.get_input_embeddings().weight, (colours, shapes)))
    target = torch.tensor(found)
    expected = F.cross_entropy(colour_logits, target[:, 1]) + F.cross_entropy(shape_logits, target[:, 2])
    torch.testing.assert_close(total - out.loss, 0.5 * expected, rtol=1e-4, atol=1e-5)
    total.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    metrics = aux.step_metrics(1, torch.device("cpu"))
    assert metrics["box_name_readout_loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert 0.0 <= metrics["box_name_read"] <= 1.0
    # a batch whose boxes follow no name (a grounded caption's "object [..]") has nothing to read
    other_ids, other_labels, _ = _absent_red_ring_batch(tokenizer, ("Where is it?", "It is here [1, 2, 3, 4]."), boxes=1)
    assert answer_box_spans(other_ids[0], other_labels[0], *bracket_token_ids(tokenizer))
    assert readout.queries(other_ids[0], other_labels[0]) == []
    cfg.data.scene_records, cfg.data.data_path, cfg.model.tiny = "scenes_train.json", ["train.json"], True
    cfg.validate()
    cfg.train.attention_supervision_layer = 9  # the readout's layer: outside the model's 2
    with pytest.raises(TrainConfigError, match="box_name_readout_weight.*layer 9 outside"):
        SyntheticWorldSupervision(model, tokenizer, cfg)
    cfg.train.attention_supervision_layer, cfg.data.scene_records = 1, None
    with pytest.raises(TrainConfigError, match="box_name_readout_weight"):
        cfg.validate()


def test_answer_name_readout_reads_each_answer_name_where_its_words_are_written():
    # train.answer_name_readout_weight: at the two positions that write an answer's colour and shape
    # words, the box heads' layer input reads the whole name (BoxNameReadout's loss); a colour word
    # alone ("red.") and a name in the question are not read.
    from ferret.training.dense_supervision import DenseVocabulary, NameDirections
    from ferret.training.synthetic_world import SyntheticWorldSupervision

    tokenizer, model, (ids, labels, batch), cfg = _name_layer_setup(
        ("Is there a blue star? What is the object <bbox_location0>?", "A pink cross, red."), boxes=0)
    cfg.train.dense_loss_weight, cfg.train.answer_name_readout_weight = 0.0, 2.0
    cfg.train.attention_supervision_weight = 0.0
    aux = SyntheticWorldSupervision(model, tokenizer, cfg)
    assert list(aux.name_readouts) == ["answer_name"]
    readout = aux.name_readouts["answer_name"][0]
    found = readout.queries(ids[0], labels[0])
    assert tokenizer.convert_ids_to_tokens([int(ids[0, j + 1]) for j, _, _ in found]) == ["\u2581pink", "\u2581cross"]
    colours, shapes = NameDirections.token_ids(tokenizer, DenseVocabulary.synthetic())
    assert {(c, s) for _, c, s in found} == {(1 + colours.index(tokenizer.convert_tokens_to_ids("\u2581pink")),
                                             1 + shapes.index(tokenizer.convert_tokens_to_ids("\u2581cross")))}
    out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), labels=labels)
    total = aux.add_losses(out.loss, batch, out, torch.device("cpu"), 0)
    total.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0  # the layers below learn
    metrics = aux.step_metrics(1, torch.device("cpu"))
    assert total.item() - out.loss.item() == pytest.approx(2.0 * metrics["answer_name_readout_loss"], rel=1e-4)
    assert metrics["answer_name_readout_loss"] > 0 and 0.0 <= metrics["answer_name_read"] <= 1.0
    assert "box_name_readout_loss" not in metrics


def test_region_cells_target_the_asked_regions_object():
    # train.region_name_supervision_heads: a turn about one region that answers without a box targets
    # that region's object; a turn whose answer writes a box (another object) or asks about two does not.
    import numpy as np

    from ferret.data.rle import encode_rle
    from ferret.training.dense_supervision import ScenePatchTargets
    from ferret.training.scene_targets import region_cells

    left, right = np.zeros((40, 40), dtype=bool), np.zeros((40, 40), dtype=bool)
    left[0:20, 0:20], right[20:40, 20:40] = True, True
    record = {"scene_id": 3, "width": 40, "height": 40, "objects": [
        {"name": "red circle", "color": "red", "shape": "circle", "box": [0, 0, 19, 19], "mask": encode_rle(left)},
        {"name": "blue star", "color": "blue", "shape": "star", "box": [20, 20, 39, 39], "mask": encode_rle(right)}]}
    targets = ScenePatchTargets([record], grid=2)
    sample = {"scene_id": 3, "conversations": [
        {"from": "human", "value": "<image>\nWhat is the object <bbox_location0>?"}, {"from": "gpt", "value": "A blue star."},
        {"from": "human", "value": "Which object is nearest to the object <bbox_location0>?"},
        {"from": "gpt", "value": "The red circle <bbox_location0>."},
        {"from": "human", "value": "Is the object <bbox_location0> left of the object <bbox_location1>?"},
        {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "Is the object <bbox_location0> of the image a red circle or a blue star?"},
        {"from": "gpt", "value": "A red circle."}],
        "box_x1y1x2y2": [[[21, 19, 39, 39]], [], [[20, 20, 39, 39]], [[0, 0, 19, 19]],
                         [[0, 0, 19, 19], [20, 20, 39, 39]], [], [[1, 1, 18, 18]], []]}
    out = region_cells(sample, targets)
    assert out.tolist() == [[False, False, False, True], [False] * 4, [False] * 4, [True, False, False, False]]


def test_region_name_heads_look_from_each_name_word_at_the_regions_object():
    # From the positions that write the referring answer's colour and shape, each listed head of the
    # coordinate heads' layer is pushed onto the region's object: -log of its attention mass there.
    from ferret.conversation import tokenize_conversation
    from ferret.training.config import TrainConfigError
    from ferret.training.synthetic_world import SyntheticWorldSupervision, grounding_supervision

    tokenizer, model, _, cfg = _name_layer_setup(("Where is the pink cross?", "The pink cross."))
    messages = [("USER", "<image>\nWhere is the pink cross?"), ("ASSISTANT", "The pink cross [10, 20, 30, 40]."),
                ("USER", "What is the object [1, 2, 3, 4] <region_fea>?"), ("ASSISTANT", "A green star.")]
    ids, labels = tokenize_conversation(messages, tokenizer)
    ids, labels = torch.as_tensor(ids).reshape(1, -1), torch.as_tensor(labels).reshape(1, -1)
    cells = torch.zeros(2, 16, dtype=torch.bool)
    cells[1, [5, 9]] = True  # the second turn's region object
    batch = {"input_ids": ids, "labels": labels, "answer_cells": [torch.zeros(1, 16, dtype=torch.bool)],
             "region_cells": [cells]}
    cfg.train.region_name_supervision_heads = [1, 2]
    region = [[torch.zeros(48, 48, dtype=torch.bool)]]
    region[0][0][4:20, 10:30] = True
    *_, first, second = grounding_supervision(model, tokenizer, cfg)[0]
    assert first.region_name and second.region_name and first.attention is model.model.layers[1].self_attn
    queries = second._queries(batch, 0)
    written = [tokenizer.convert_ids_to_tokens([int(ids[0, j + 1])])[0] for j, *_ in queries]
    assert written == ["\u2581green", "\u2581star"]  # not the first turn's "pink cross" (no region)
    assert all(h == 2 and not t[0] and t[1:].equal(cells[1]) and w == () for _, h, t, w, _ in queries)
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), region_masks=region, output_attentions=True)
    loss = second.loss(batch)
    from ferret.training.grounding import spliced_index

    start, to_spliced = spliced_index(ids[0], 16)
    rows = out.attentions[1][0, 2, [to_spliced(j) for j, *_ in queries]][:, start:start + 16]
    expected = -rows[:, cells[1]].sum(-1).log().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert second.last_mass == pytest.approx(rows[:, cells[1]].sum(-1).mean().item(), rel=1e-4)
    # the step's log carries the mass (none of it without a referring answer in the batch)
    aux = SyntheticWorldSupervision(model, tokenizer, cfg)
    out = model(input_ids=ids, images=torch.randn(1, 3, 48, 48), region_masks=region, labels=labels)
    aux.add_losses(out.loss, batch, out, torch.device("cpu"), 0)
    assert 0.0 < aux.step_metrics(1, torch.device("cpu"))["region_name_mass"] < 1.0
    cfg.data.scene_records, cfg.data.data_path, cfg.model.tiny = "scenes_train.json", ["train.json"], True
    cfg.validate()
    cfg.train.attention_supervision_weight = 0.0
    with pytest.raises(TrainConfigError, match="region_name_supervision_heads"):
        cfg.validate()
    cfg.train.attention_supervision_weight, cfg.train.region_name_supervision_heads = 1.0, [4]
    with pytest.raises(TrainConfigError, match="region_name_supervision_heads: attention supervision: head 4"):
        grounding_supervision(model, tokenizer, cfg)
