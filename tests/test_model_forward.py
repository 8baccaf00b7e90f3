"""Tiny-model tests of the Ferret forward pass: splicing, loss, gradients, region-count errors, layouts."""

from __future__ import annotations

import pytest
import torch

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ferret.model import RegionTokenMismatchError
from ferret.model.multimodal_inputs import splice_multimodal_embeddings
from ferret.model.region_adapter import MaskPoolingRegionAdapter
from ferret.model.tiny import build_tiny_model

NUM_PATCHES = 64  # tiny tower: 112 px / 14 px patches -> 8 x 8


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    model, tokenizer = build_tiny_model(tiny_tokenizer, seed=0)
    return model, tokenizer


def _box_mask(w=40, h=30, x=(5, 20), y=(3, 12)):
    mask = torch.zeros(w, h, dtype=torch.bool)
    mask[x[0] : x[1], y[0] : y[1]] = True
    return mask


def _ids(tokenizer, text_before_image="hi", text_after="look at", regions=0, tail="ok"):
    region_id = tokenizer.convert_tokens_to_ids("<region_fea>")
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text_before_image, add_special_tokens=False)
    ids += [IMAGE_TOKEN_INDEX] + tokenizer.encode(text_after, add_special_tokens=False)
    for _ in range(regions):
        ids += tokenizer.encode(" [1, 2, 3, 4]", add_special_tokens=False) + [region_id]
    ids += tokenizer.encode(tail, add_special_tokens=False)
    return ids


# --------------------------------------------------------------------------- pure splicing


def test_splice_places_image_and_regions_and_pads_right():
    embed = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, IMAGE_TOKEN_INDEX, 9, 3], [1, IMAGE_TOKEN_INDEX, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[5, 5, 5, 5, 5], [6, 6, 6, 6, 6]])
    image = [torch.full((3, 4), 7.0), torch.full((3, 4), 8.0)]
    regions = [torch.full((1, 4), -1.0), None]
    out = splice_multimodal_embeddings(ids, mask, labels, embed, image, regions, region_token_id=9)
    assert out.inputs_embeds.shape == (2, 7, 4)
    torch.testing.assert_close(out.inputs_embeds[0, 2:5], image[0])
    torch.testing.assert_close(out.inputs_embeds[0, 5], regions[0][0])  # the region token row
    torch.testing.assert_close(out.inputs_embeds[0, 6], embed.weight[3])
    assert out.attention_mask.tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert out.position_ids.tolist() == [list(range(7)), [0, 1, 2, 3, 4, 0, 0]]
    assert out.labels[0].tolist() == [5, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, 5]
    assert out.labels[1].tolist() == [6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX]
    assert torch.all(out.inputs_embeds[1, 5:] == 0)


def test_splice_left_padding_mirrors_right_padding():
    embed = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 4, 5], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    image = [torch.ones(2, 4), None]
    right = splice_multimodal_embeddings(ids, mask, None, embed, image, [None, None], 9, "right")
    left = splice_multimodal_embeddings(ids, mask, None, embed, image, [None, None], 9, "left")
    assert left.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert left.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    torch.testing.assert_close(left.inputs_embeds[1, 3:], right.inputs_embeds[1, :2])
    assert left.labels is None


def test_splice_keeps_the_inputs_padded_width():
    # A collator padding to a multiple pads every row: the spliced batch keeps that width (plus
    # the image rows), so the LLM sees few distinct shapes; the padding stays masked.
    embed = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 4, 0, 0, 0], [1, 2, IMAGE_TOKEN_INDEX, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    image = [torch.ones(3, 4), torch.ones(3, 4)]
    out = splice_multimodal_embeddings(ids, mask, None, embed, image, [None, None], 9)
    assert out.inputs_embeds.shape == (2, 8, 4)
    assert out.attention_mask.tolist() == [[1] * 5 + [0] * 3] * 2
    tight = splice_multimodal_embeddings(ids[:, :3], mask[:, :3], None, embed, image, [None, None], 9)
    torch.testing.assert_close(out.inputs_embeds[:, :5], tight.inputs_embeds)


def test_splice_rejects_region_token_count_mismatch():
    embed = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 9, 9]])
    with pytest.raises(RegionTokenMismatchError, match="2 <region_fea> token"):
        splice_multimodal_embeddings(ids, None, None, embed, [torch.ones(2, 4)], [torch.ones(1, 4)], 9)


def test_splice_rejects_two_images_and_missing_image():
    embed = torch.nn.Embedding(10, 4)
    two = torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]])
    with pytest.raises(ValueError, match="2 image tokens"):
        splice_multimodal_embeddings(two, None, None, embed, [torch.ones(2, 4)], [None], 9)
    one = torch.tensor([[1, IMAGE_TOKEN_INDEX]])
    with pytest.raises(ValueError, match="no image was given"):
        splice_multimodal_embeddings(one, None, None, embed, [None], [None], 9)


# --------------------------------------------------------------------------- the model


def test_forward_backward_reaches_projector_sampler_llm_not_tower(tiny):
    model, tokenizer = tiny
    model.train()
    try:
        ids = torch.tensor([_ids(tokenizer, regions=2)])
        labels = ids.clone().masked_fill(ids < 0, IGNORE_INDEX)
        images = torch.randn(1, 3, 112, 112)
        masks = [[_box_mask(), _box_mask(x=(0, 3), y=(0, 2))]]
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, images=images, region_masks=masks, labels=labels,
                    region_generator=torch.Generator().manual_seed(0))
        assert out.logits.shape == (1, ids.shape[1] - 1 + NUM_PATCHES, model.config.vocab_size)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        inner = model.model
        assert inner.mm_projector.weight.grad is not None and inner.mm_projector.weight.grad.abs().sum() > 0
        sampler_grads = [p.grad for p in inner.region_geo_sampler.parameters()]
        assert all(g is not None for g in sampler_grads) and sum(g.abs().sum() for g in sampler_grads) > 0
        assert inner.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        assert model.lm_head.weight.grad.abs().sum() > 0
        tower_params = list(inner.vision_tower.parameters())
        assert tower_params and all(not p.requires_grad and p.grad is None for p in tower_params)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_unfrozen_tower_receives_gradients(tiny_tokenizer):
    model, tokenizer = build_tiny_model(tiny_tokenizer, seed=1)
    model.get_vision_tower().requires_grad_(True)
    ids = torch.tensor([_ids(tokenizer)])
    labels = ids.clone().masked_fill(ids < 0, IGNORE_INDEX)
    model(input_ids=ids, images=torch.randn(1, 3, 112, 112), labels=labels).loss.backward()
    patch = model.get_vision_tower().vision_tower.vision_model.embeddings.patch_embedding.weight
    assert patch.grad is not None and patch.grad.abs().sum() > 0


def test_image_positions_are_ignored_in_labels_and_loss_matches_manual(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([_ids(tokenizer, regions=1)])
    labels = ids.clone().masked_fill(ids < 0, IGNORE_INDEX)
    merged = model.prepare_multimodal_inputs(ids, None, labels, torch.randn(1, 3, 112, 112), [[_box_mask()]],
                                             generator=torch.Generator().manual_seed(0))
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    assert torch.all(merged.labels[0, at : at + NUM_PATCHES] == IGNORE_INDEX)
    assert merged.labels[0, at + NUM_PATCHES :].tolist() == labels[0, at + 1 :].tolist()
    with torch.no_grad():
        out = model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, labels=merged.labels)
    logits = out.logits[0, :-1]
    target = merged.labels[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


def test_logits_at_labels_gives_the_full_forwards_loss_gradients_and_labelled_rows(tiny):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    a, b = _ids(tokenizer, regions=1), _ids(tokenizer, text_before_image="a longer text here", tail="one two three")
    width = max(len(a), len(b))
    ids = torch.tensor([a + [pad] * (width - len(a)), b + [pad] * (width - len(b))])
    mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)), [1] * len(b) + [0] * (width - len(b))])
    # Only the answers are labelled, as in training: the last 3 tokens of each sample.
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, len(a) - 3 : len(a)] = ids[0, len(a) - 3 : len(a)]
    labels[1, len(b) - 3 : len(b)] = ids[1, len(b) - 3 : len(b)]
    images = torch.randn(2, 3, 112, 112)

    def run(**extra):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, images=images, region_masks=[[_box_mask()], []],
                    region_generator=torch.Generator().manual_seed(3), **extra)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run()
    fast, fast_grads = run(logits_at_labels=True)
    torch.testing.assert_close(fast.loss, full.loss)
    assert fast.logits.shape == (6, model.config.vocab_size)  # 3 labelled tokens per row, each predicted once
    assert full_grads.keys() == fast_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=ids, logits_at_labels=True)


def test_padded_batch_matches_single_samples(tiny):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    a, b = _ids(tokenizer, regions=1), _ids(tokenizer, text_before_image="a longer text here", regions=0)
    width = max(len(a), len(b))
    ids = torch.tensor([a + [pad] * (width - len(a)), b + [pad] * (width - len(b))])
    mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)), [1] * len(b) + [0] * (width - len(b))])
    images = torch.randn(2, 3, 112, 112)
    masks = [[_box_mask()], []]
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, images=images, region_masks=masks,
                      region_generator=torch.Generator().manual_seed(3)).logits
        single_a = model(input_ids=torch.tensor([a]), images=images[:1], region_masks=[masks[0]],
                         region_generator=torch.Generator().manual_seed(3)).logits
        single_b = model(input_ids=torch.tensor([b]), images=images[1:]).logits
    torch.testing.assert_close(batch[0, : single_a.shape[1]], single_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[1, : single_b.shape[1]], single_b[0], atol=1e-4, rtol=1e-4)


def test_image_without_regions_and_text_without_image(tiny):
    model, tokenizer = tiny
    with torch.no_grad():
        no_regions = model(input_ids=torch.tensor([_ids(tokenizer)]), images=torch.randn(1, 3, 112, 112))
        text_ids = torch.tensor([tokenizer.encode("just some text, no picture")])
        text_only = model(input_ids=text_ids)
    assert no_regions.logits.shape[1] == len(_ids(tokenizer)) - 1 + NUM_PATCHES
    assert text_only.logits.shape[:2] == text_ids.shape
    assert torch.isfinite(no_regions.logits).all() and torch.isfinite(text_only.logits).all()


def test_region_token_count_must_match_masks(tiny):
    model, tokenizer = tiny
    image = torch.randn(1, 3, 112, 112)
    two_tokens = torch.tensor([_ids(tokenizer, regions=2)])
    with pytest.raises(RegionTokenMismatchError, match="2 <region_fea> token.*1 region"):
        model(input_ids=two_tokens, images=image, region_masks=[[_box_mask()]])
    one_token = torch.tensor([_ids(tokenizer, regions=1)])
    with pytest.raises(RegionTokenMismatchError, match="1 <region_fea> token.*2 region"):
        model(input_ids=one_token, images=image, region_masks=[[_box_mask(), _box_mask()]])
    with pytest.raises(RegionTokenMismatchError, match="1 <region_fea> token.*0 region"):
        model(input_ids=one_token, images=image)


def test_bad_inputs_give_clear_errors(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([_ids(tokenizer)])
    with pytest.raises(ValueError, match="no images were given"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"images must be shaped \[B, 3, 112, 112\]"):
        model(input_ids=ids, images=torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="3 images for 1 samples"):
        model(input_ids=ids, images=torch.randn(3, 3, 112, 112))
    text = torch.tensor([tokenizer.encode("text [1, 2] <region_fea>")])
    with pytest.raises(ValueError, match="region masks but no image"):
        model(input_ids=text, region_masks=[[_box_mask()]])
    empty = torch.zeros(40, 30, dtype=torch.bool)
    with pytest.raises(ValueError, match="empty"):
        model(input_ids=torch.tensor([_ids(tokenizer, regions=1)]), images=torch.randn(1, 3, 112, 112),
              region_masks=[[empty]])


# --------------------------------------------------------------------------- feature layouts


def test_official_and_aligned_layouts_differ_exactly_by_the_transpose():
    torch.manual_seed(0)
    feature_maps = torch.randn(1, 64, 16)
    official = MaskPoolingRegionAdapter(16, 8, num_points=None, feature_layout="official")
    aligned = MaskPoolingRegionAdapter(16, 8, num_points=None, feature_layout="aligned")
    aligned.load_state_dict(official.state_dict())
    mask = _box_mask(w=40, h=30, x=(2, 31), y=(20, 27))  # an off-diagonal, non-square region
    from_official = official(feature_maps, [[mask]])[0]
    from_aligned_transposed = aligned(feature_maps, [[mask.T.contiguous()]])[0]
    from_aligned = aligned(feature_maps, [[mask]])[0]
    torch.testing.assert_close(from_official, from_aligned_transposed, atol=1e-5, rtol=1e-5)
    assert (from_official - from_aligned).abs().max() > 1e-3  # the layouts really differ


def test_geo_sampler_point_features_follow_the_layout(tiny_tokenizer):
    official, _ = build_tiny_model(tiny_tokenizer, feature_layout="official")
    aligned, _ = build_tiny_model(tiny_tokenizer, feature_layout="aligned")
    assert official.model.region_geo_sampler.feature_layout == "official"
    assert aligned.model.region_geo_sampler.feature_layout == "aligned"
    feature_maps = torch.randn(1, 64, official.config.mm_hidden_size)
    points = torch.rand(1, 50, 2)
    index = torch.zeros(1, dtype=torch.long)
    got = official.model.region_geo_sampler.point_features(feature_maps, points, index)
    want = aligned.model.region_geo_sampler.point_features(feature_maps, points.flip(-1), index)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mask_pooling_model_variant_runs(tiny_tokenizer):
    model, tokenizer = build_tiny_model(tiny_tokenizer, region_geo_sampler=False)
    assert not hasattr(model.model, "region_geo_sampler")
    assert tuple(model.model.region_fea_adapter.weight.shape) == (64, 32)
    ids = torch.tensor([_ids(tokenizer, regions=1)])
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(1, 3, 112, 112), region_masks=[[_box_mask()]])
    assert torch.isfinite(out.logits).all()


def test_config_validation_errors():
    from ferret.model import FerretConfig, FerretConfigError

    with pytest.raises(FerretConfigError, match="feature_layout"):
        FerretConfig(feature_layout="sideways")
    with pytest.raises(FerretConfigError, match="sampler_pooler_mode"):
        FerretConfig(sampler_pooler_mode="median")
    with pytest.raises(FerretConfigError, match="neither a known vision tower"):
        FerretConfig(mm_vision_tower="/nonexistent/clip")
    with pytest.raises(FerretConfigError, match="mm_hidden_size=512"):
        FerretConfig(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=512)
    with pytest.raises(FerretConfigError, match="mm_use_im_start_end"):
        FerretConfig(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_use_im_start_end=True)
    released = FerretConfig(mm_vision_tower="openai/clip-vit-large-patch14-336")
    assert released.feature_layout == "official"  # configs without the field are the released ones
    assert released.vision_tower_config().image_size == 336


def test_training_batches_without_image_or_regions_still_give_every_module_a_gradient(tiny_tokenizer):
    from ferret.training.gradient_cover import install_gradient_cover

    model, tokenizer = build_tiny_model(tiny_tokenizer, seed=6)
    install_gradient_cover(model)  # (as the trainer does: DeepSpeed needs it)
    model.train()
    text = torch.tensor([tokenizer.encode("only text in this batch")])
    model(input_ids=text, labels=text).loss.backward()
    for module in (model.model.mm_projector, model.model.region_geo_sampler):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.all(g == 0) for g in grads)
    assert all(p.grad is None for p in model.get_vision_tower().parameters())  # frozen: untouched
    model.eval()
    with torch.no_grad():  # inference never pays for it
        merged = model.prepare_multimodal_inputs(text)
    assert torch.equal(merged.inputs_embeds[0], model.get_input_embeddings()(text[0]))


def test_training_runs_the_region_module_on_every_image_without_changing_the_embeddings(tiny_tokenizer):
    # DeepSpeed ranks must run the same modules whatever their batch holds: with the trainer's
    # gradient cover, a training step also runs the region module on an image with no region
    # (placeholder mask), with a zero gradient, and the embeddings are those of inference.
    from ferret.training.gradient_cover import install_gradient_cover

    model, tokenizer = build_tiny_model(tiny_tokenizer, seed=7)
    ids = torch.tensor([_ids(tokenizer)])
    image = torch.randn(1, 3, 112, 112)
    calls = []
    model.model.region_geo_sampler.register_forward_hook(lambda *args: calls.append(1))
    model.eval()
    with torch.no_grad():
        expected = model.prepare_multimodal_inputs(ids, images=image).inputs_embeds
    assert calls == []  # inference skips it
    model.train()
    uncovered = model.prepare_multimodal_inputs(ids, images=image)
    assert calls == []  # without the cover a training forward computes what inference does
    torch.testing.assert_close(uncovered.inputs_embeds.detach(), expected, rtol=0, atol=0)
    install_gradient_cover(model)
    merged = model.prepare_multimodal_inputs(ids, images=image)
    assert calls == [1]
    torch.testing.assert_close(merged.inputs_embeds.detach(), expected)
    merged.inputs_embeds.sum().backward()
    grads = [p.grad for p in model.model.region_geo_sampler.parameters()]
    assert grads and all(g is not None and torch.all(g == 0) for g in grads)
