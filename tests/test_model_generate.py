"""Greedy generation of the tiny Ferret: deterministic, KV cache == full recompute, batch == single."""

from __future__ import annotations

import pytest
import torch

from ferret.constants import IMAGE_TOKEN_INDEX
from ferret.model.tiny import build_tiny_model

STEPS = 8


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=2)


def _region_mask():
    mask = torch.zeros(50, 40, dtype=torch.bool)
    mask[10:30, 5:25] = True
    return mask


def _prompt(tokenizer, regions: int):
    region_id = tokenizer.convert_tokens_to_ids("<region_fea>")
    ids = [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX] + tokenizer.encode("what is", add_special_tokens=False)
    for _ in range(regions):
        ids += tokenizer.encode(" [1, 2, 3, 4]", add_special_tokens=False) + [region_id]
    return ids


def _seeded():
    return torch.Generator().manual_seed(11)


def _no_cache_greedy(model, ids, images, masks, steps):
    """Reference decoding: the whole prompt (image, regions, generated text) recomputed every step."""
    sequence, produced = torch.tensor([ids]), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=sequence, images=images, region_masks=masks, use_cache=False,
                           region_generator=_seeded()).logits
        token = int(logits[0, -1].argmax())
        produced.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    return produced


def test_greedy_is_deterministic_and_equals_no_cache_decoding(tiny):
    model, tokenizer = tiny
    ids = _prompt(tokenizer, regions=2)
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    masks = [[_region_mask(), _region_mask().roll(7, 0)]]
    # eos_token_id=None: decode the full STEPS, whatever the random model says.
    kwargs = dict(images=images, region_masks=masks, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    first = model.generate(input_ids=torch.tensor([ids]), region_generator=_seeded(), **kwargs)
    second = model.generate(input_ids=torch.tensor([ids]), region_generator=_seeded(), **kwargs)
    assert first.shape == (1, STEPS)  # only the new tokens come back
    assert torch.equal(first, second)
    assert first[0].tolist() == _no_cache_greedy(model, ids, images, masks, STEPS)


def test_regions_change_the_answer_only_through_their_features(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([_prompt(tokenizer, regions=1)])
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(input_ids=ids, images=images, region_masks=[[_region_mask()]], region_generator=_seeded()).logits
        moved = torch.zeros(50, 40, dtype=torch.bool)
        moved[40:50, 30:40] = True
        b = model(input_ids=ids, images=images, region_masks=[[moved]], region_generator=_seeded()).logits
    region_at = ids.shape[1] - 1 + 64 - 1  # the last prompt position is the region token
    assert torch.allclose(a[0, :region_at], b[0, :region_at])  # causal: nothing before the region moves
    assert not torch.allclose(a[0, region_at:], b[0, region_at:])


def test_text_only_generation_returns_new_tokens(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer.encode("hello there")])
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 4)
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    assert int(out[0, 0]) == first


def test_batched_generation_equals_one_by_one(tiny):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    prompts = [_prompt(tokenizer, 1), _prompt(tokenizer, 0) + tokenizer.encode(" and more words", add_special_tokens=False)]
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    masks = [[_region_mask()], []]
    width = max(map(len, prompts))
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
    attention = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    batch = model.generate(input_ids=ids, attention_mask=attention, images=images, region_masks=masks,
                           region_generator=_seeded(), **kwargs)
    single = [
        model.generate(input_ids=torch.tensor([prompts[0]]), images=images[:1], region_masks=masks[:1],
                       region_generator=_seeded(), **kwargs),
        model.generate(input_ids=torch.tensor([prompts[1]]), images=images[1:], **kwargs),
    ]
    assert batch[0].tolist() == single[0][0].tolist()
    assert batch[1].tolist() == single[1][0].tolist()


def test_generation_without_cache_is_refused_clearly(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(input_ids=torch.tensor([_prompt(tokenizer, 0)]), images=torch.randn(1, 3, 112, 112),
                       use_cache=False, max_new_tokens=2)


def test_images_with_a_filled_cache_are_refused(tiny):
    from transformers import DynamicCache

    model, tokenizer = tiny
    ids = torch.tensor([_prompt(tokenizer, 0)])
    image = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        out = model(input_ids=ids, images=image, use_cache=True)
    assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() > 0
    with pytest.raises(ValueError, match="prefill"):
        model(input_ids=ids, images=image, cache=out.cache)
