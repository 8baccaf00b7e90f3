"""FerretChat on a tiny random model: one call, multi-turn regions, batch == one-by-one, streaming, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferret.chat import Answer, ChatHistory, FerretChat
from ferret.model.tiny import build_tiny_model, save_tiny_model
from ferret.processing import build_image_processor
from ferret.regions import Box, FreeForm, Point, RegionError

EXAMPLES = Path(__file__).resolve().parents[1] / "ferret" / "assets" / "examples"
TOKENS = 6


@pytest.fixture(scope="module")
def chat(tiny_tokenizer):
    model, tokenizer = build_tiny_model(tiny_tokenizer, seed=4)
    return FerretChat(tokenizer, model, build_image_processor(112), context_len=512)


@pytest.fixture(scope="module")
def image():
    return Image.open(EXAMPLES / "shapes.png").convert("RGB")


def test_ask_with_a_box_returns_text_regions_and_history(chat, image):
    answer = chat.ask(image, "What is this?", regions=[Box(50, 60, 150, 160)], max_new_tokens=TOKENS)
    assert isinstance(answer, Answer) and isinstance(answer.text, str)
    assert isinstance(answer.regions, list)
    assert answer.history.image_size == image.size
    assert len(answer.history.region_masks) == 1 and answer.history.region_masks[0].shape == (400, 300)
    single = chat.ask(image, "What is this?", regions=Box(50, 60, 150, 160), max_new_tokens=TOKENS)
    assert single.text == answer.text  # one region need not be wrapped in a list
    user_text, reply = answer.history.turns[0]
    assert "[125, 200, 375, 533] <region_fea>" in user_text and reply == answer.text
    again = chat.ask(image, "What is this?", regions=[Box(50, 60, 150, 160)], max_new_tokens=TOKENS)
    assert again.text == answer.text  # greedy and seeded region sampling: deterministic


def test_regions_over_several_turns_and_placeholders(chat, image):
    first = chat.ask(image, "Compare <region> with", regions=[Point(100, 110)], max_new_tokens=TOKENS)
    second = chat.ask(image, "and what about <region> and <region>?", regions=[Box(230, 50, 330, 150), Box(0, 0, 20, 20)],
                      history=first.history, max_new_tokens=TOKENS)
    assert len(second.history.turns) == 2 and len(second.history.region_masks) == 3
    assert second.history.turns[1][0].count("<region_fea>") == 2
    third = chat.ask(image, "Anything else?", history=second.history, max_new_tokens=TOKENS)
    assert len(third.history.region_masks) == 3  # earlier regions stay referenced
    # The whole prompt keeps one <region_fea> id per mask (else the model would refuse it).
    sample = chat._prepare(image, "Last one", [], third.history).sample
    region_id = chat.tokenizer.convert_tokens_to_ids("<region_fea>")
    assert int((sample["input_ids"] == region_id).sum()) == len(sample["region_masks"]) == 3
    assert int((sample["input_ids"] == -200).sum()) == 1


def test_free_form_region_and_image_from_a_path(chat):
    scribble = np.zeros((300, 400), dtype=bool)
    scribble[150:200, 100:180] = True
    answer = chat.ask(str(EXAMPLES / "shapes.png"), "What is here?", regions=[FreeForm(scribble)], max_new_tokens=TOKENS)
    assert torch.equal(answer.history.region_masks[0], torch.from_numpy(scribble.T.copy()))


def test_no_regions_and_no_image(chat, image):
    plain = chat.ask(image, "Describe the image.", max_new_tokens=TOKENS)
    assert plain.history.region_masks == ()
    text_only = chat.ask(None, "Say hello.", max_new_tokens=TOKENS)
    assert text_only.regions == [] and text_only.history.image_size is None


def test_batch_answers_equal_one_by_one(chat, image):
    tall = Image.open(EXAMPLES / "tall.png").convert("RGB")
    first = chat.ask(image, "What is it?", regions=[Box(50, 60, 150, 160)], max_new_tokens=TOKENS)
    requests = [
        (image, "What is it?", [Box(50, 60, 150, 160)]),
        (tall, "Where is the object? Tell me everything you see in detail.", []),
        (image, "And <region>?", [Point(280, 100)], first.history),
        (None, "Just text.",),
    ]
    batched = chat.ask_batch(requests, max_new_tokens=TOKENS)
    single = [chat.ask(*r, max_new_tokens=TOKENS) for r in requests]
    assert [a.text for a in batched] == [a.text for a in single]
    assert len({a.text for a in single}) > 1  # the answers depend on the request (the test can fail)
    assert [len(a.history.region_masks) for a in batched] == [1, 0, 2, 0]


def test_stream_yields_the_same_text(chat, image):
    pieces = list(chat.stream(image, "What is it?", regions=[Box(50, 60, 150, 160)], max_new_tokens=TOKENS))
    answer = chat.ask(image, "What is it?", regions=[Box(50, 60, 150, 160)], max_new_tokens=TOKENS)
    assert "".join(pieces).strip() == answer.text


def test_answer_boxes_are_parsed_to_image_pixels(chat, image, monkeypatch):
    reply = "The red circle [125, 200, 375, 533] is left of the square."
    tokens = torch.tensor([chat.tokenizer.encode(reply, add_special_tokens=False)])
    monkeypatch.setattr(chat.model, "generate", lambda **kwargs: tokens)
    answer = chat.ask(image, "Where is the circle?", max_new_tokens=TOKENS)
    assert answer.text == reply
    assert len(answer.regions) == 1
    box = answer.regions[0].box
    assert box == pytest.approx((50.0, 60.0, 150.0, 159.9), abs=0.5)
    assert "circle" in answer.regions[0].phrase


def test_bad_requests_raise_clear_errors(chat, image, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat.ask(tmp_path / "missing.png", "What?")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a readable image"):
        chat.ask(tmp_path / "broken.png", "What?")
    with pytest.raises(RegionError):
        chat.ask(image, "What?", regions=[Point(1000, 5)])
    with pytest.raises(ValueError, match="placeholder"):
        chat.ask(image, "<region> and <region>?", regions=[Point(5, 5)])
    with pytest.raises(ValueError, match="placeholder"):
        chat.ask(image, "What is <region>?")
    with pytest.raises(ValueError, match="regions need an image"):
        chat.ask(None, "What?", regions=[Point(5, 5)])
    history = ChatHistory(turns=(("hi", "hello"),), image_size=(10, 10))
    with pytest.raises(ValueError, match="new conversation"):
        chat.ask(image, "What?", history=history)
    with pytest.raises(ValueError, match="context"):
        chat.ask(image, "What?", max_new_tokens=10_000)
    with pytest.raises(ValueError, match="non-empty"):
        chat.ask(image, "   ")


def test_from_pretrained_on_a_saved_tiny_model(tiny_tokenizer, tmp_path, image):
    save_tiny_model(tmp_path / "tiny", tokenizer=tiny_tokenizer, seed=4)
    loaded = FerretChat.from_pretrained(tmp_path / "tiny", device="cpu")
    answer = loaded.ask(image, "What is this?", regions=[Box(50, 60, 150, 160)], max_new_tokens=TOKENS)
    assert isinstance(answer.text, str) and answer.history.turns
