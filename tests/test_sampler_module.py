"""GeoRegionSampler (ferret.model.sampler): names, shapes, forward forms, gradients, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ferret.model.sampler import GeoRegionSampler, SamplerConfigError

KEYS_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ferret_sampler_keys.json"
PREFIX = "model.region_geo_sampler."
TINY = dict(input_dim=6, output_dim=5, num_init_point=24, num_sub_point=(8, 4), num_neighbor=(4, 3))


def box_mask(width: int, height: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    mask = torch.zeros(width, height, dtype=torch.bool)
    mask[x0:x1, y0:y1] = True
    return mask


def tiny_sampler(**overrides) -> GeoRegionSampler:
    torch.manual_seed(0)
    return GeoRegionSampler(**{**TINY, **overrides})


def feature_maps(batch: int = 3, width: int = 6, requires_grad: bool = False) -> torch.Tensor:
    maps = torch.randn(batch, 16, width, generator=torch.Generator().manual_seed(1))
    return maps.requires_grad_(requires_grad)


@pytest.mark.parametrize("model", ["ferret-7b", "ferret-13b"])
def test_parameter_names_and_shapes_match_the_released_checkpoints(model):
    if not KEYS_FILE.is_file():
        pytest.skip(f"{KEYS_FILE} is absent (the shared fixtures folder is not mounted)")
    spec = json.loads(KEYS_FILE.read_text())["models"][model]
    expected = {k[len(PREFIX) :]: tuple(v) for k, v in spec["keys"].items() if k.startswith(PREFIX)}
    assert expected, "fixture lists no sampler keys"
    with torch.device("meta"):
        sampler = GeoRegionSampler(1024, spec["hidden_size"], pooler_mode="max")
    assert {k: tuple(v.shape) for k, v in sampler.state_dict().items()} == expected


def test_released_geometry_is_the_default():
    with torch.device("meta"):
        sampler = GeoRegionSampler(1024, 4096)
    assert (sampler.num_init_point, sampler.num_sub_point, sampler.num_neighbor) == (512, (128, 32), (24, 24))
    assert (sampler.pooler_mode, sampler.feature_layout) == ("max", "official")


def test_forward_nested_lists_gives_none_for_an_image_without_regions():
    sampler = tiny_sampler()
    masks = [[box_mask(30, 20, 0, 0, 10, 10), box_mask(30, 20, 5, 5, 25, 15)], [], [box_mask(8, 9, 2, 2, 6, 7)]]
    out = sampler(feature_maps(), masks, generator=torch.Generator().manual_seed(0))
    assert len(out) == 3 and out[1] is None
    assert out[0].shape == (2, 5) and out[2].shape == (1, 5)
    assert sampler(feature_maps(), [[], [], []]) == [None, None, None]


def test_forward_packed_form_matches_nested_and_layered_calls():
    sampler = tiny_sampler()
    maps = feature_maps()
    masks = [box_mask(30, 20, 0, 0, 10, 10), box_mask(30, 20, 5, 5, 25, 15), box_mask(8, 9, 2, 2, 6, 7)]
    nested = sampler(maps, [[masks[0], masks[1]], [], [masks[2]]], generator=torch.Generator().manual_seed(4))
    index = torch.tensor([0, 0, 2])
    packed = sampler(maps, masks, image_index=index, generator=torch.Generator().manual_seed(4))
    assert packed[1] is None
    torch.testing.assert_close(torch.cat([packed[0], packed[2]]), torch.cat([nested[0], nested[2]]))
    # The same result by hand through the layered API.
    generator = torch.Generator().manual_seed(4)
    points = sampler.sample_points(masks, generator)
    manual = sampler.forward_points(points, sampler.point_features(maps, points, index), generator=generator)
    torch.testing.assert_close(manual, torch.cat([nested[0], nested[2]]))


def test_feature_layout_switch_changes_what_is_read():
    maps = feature_maps()
    points = torch.rand(2, 24, 2, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 1])
    official = tiny_sampler(feature_layout="official").point_features(maps, points, index)
    aligned = tiny_sampler(feature_layout="aligned").point_features(maps, points, index)
    transposed = maps.reshape(3, 4, 4, 6).transpose(1, 2).reshape(3, 16, 6)
    torch.testing.assert_close(official, tiny_sampler(feature_layout="aligned").point_features(transposed, points, index))
    assert not torch.allclose(official, aligned)


def test_backward_reaches_every_parameter_and_the_feature_map():
    sampler = tiny_sampler()
    maps = feature_maps(requires_grad=True)
    masks = [[box_mask(30, 20, 0, 0, 10, 10)], [box_mask(30, 20, 5, 5, 25, 15), box_mask(30, 20, 1, 1, 29, 3)], []]
    out = sampler(maps, masks, generator=torch.Generator().manual_seed(0))
    (out[0].square().sum() + out[1].sin().sum()).backward()
    assert maps.grad is not None and maps.grad[:2].abs().sum() > 0
    assert maps.grad[2].abs().sum() == 0  # the image without regions contributes nothing
    for name, parameter in sampler.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_params_are_views_of_the_module_parameters():
    sampler = tiny_sampler()
    params = sampler.params()
    assert params.stages[1].conv_weight is sampler.agg_projector_list[1].net[0].weight
    assert params.dim_weight is sampler.dim_projector.weight
    assert params.stages[0].ln_eps == sampler.agg_projector_list[0].norm.eps == 1e-5


def test_reduced_precision_module_accepts_fp32_feature_maps():
    sampler = tiny_sampler().to(torch.bfloat16)
    out = sampler(feature_maps(), [[box_mask(12, 12, 0, 0, 6, 6)], [], []], generator=torch.Generator().manual_seed(0))
    assert out[0].dtype == torch.bfloat16 and torch.isfinite(out[0].float()).all()


def test_bad_configuration_and_inputs_raise_clear_errors():
    with pytest.raises(SamplerConfigError, match="pooler_mode"):
        tiny_sampler(pooler_mode="sum")
    with pytest.raises(SamplerConfigError, match="feature_layout"):
        tiny_sampler(feature_layout="diagonal")
    with pytest.raises(SamplerConfigError, match="stage 1"):
        tiny_sampler(num_sub_point=(8, 10))
    with pytest.raises(SamplerConfigError, match="one entry per stage"):
        tiny_sampler(num_neighbor=(4,))
    sampler = tiny_sampler()
    with pytest.raises(ValueError, match="one list per image"):
        sampler(feature_maps(), [[box_mask(8, 8, 0, 0, 4, 4)]])
    with pytest.raises(ValueError, match="region 1"):
        sampler(feature_maps(), [[box_mask(8, 8, 0, 0, 4, 4), torch.zeros(8, 8, dtype=torch.bool)], [], []])
    with pytest.raises(ValueError, match="feature_map"):
        sampler(feature_maps(width=7), [[box_mask(8, 8, 0, 0, 4, 4)], [], []])
    with pytest.raises(ValueError, match="image_index"):
        sampler(feature_maps(), [box_mask(8, 8, 0, 0, 4, 4)], image_index=torch.tensor([0, 1]))


def test_the_model_encodes_regions_in_its_own_dtype_under_bf16_autocast():
    # Training with train.precision=bf16-mixed autocasts the forward; the region module must not follow
    # (bf16 point positions: a model trained so named points 0.81 at fp32 inference, session 39).
    from ferret.model.tiny import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    size = model.get_vision_tower().config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    maps, _ = model.encode_images(pixels)
    masks = [[box_mask(size, size, 3, 5, size // 2, size - 4), box_mask(size, size, 9, 9, 10, 10)]]
    plain = model.encode_regions(maps, masks, generator=torch.Generator().manual_seed(0))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model.encode_regions(maps, masks, generator=torch.Generator().manual_seed(0))[0]
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)
