"""Golden tests: our sampler against outputs of the released Ferret code (shared/fixtures).

The fixtures live outside the project (`<repo>/../shared/fixtures`); without them these tests
skip with a message saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferret.model.sampler import GeoRegionSampler
from ferret_kernels import reference
from ferret_kernels.params import SamplerParams, StageParams

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
# (pooler, input_dim, output_dim) of the two golden samplers; both have the released geometry
# (512 points, stages 128 -> 32, k = 24). Each fixture holds its state_dict, two 24 x 24 maps,
# points and their features, the released output with FPS start 0, and a two-mask case.
CASES = [("max", 64, 96), ("mean", 48, 80)]
RELATIVE_TOLERANCE = 1e-5


def load_golden(pool: str) -> dict:
    path = FIXTURES / f"sampler_golden_{pool}.pt"
    if not path.is_file():
        pytest.skip(f"golden fixture {path} is absent (the shared fixtures folder is not mounted)")
    return torch.load(path, weights_only=True)


def build_module(golden: dict, pool: str, input_dim: int, output_dim: int) -> GeoRegionSampler:
    sampler = GeoRegionSampler(input_dim, output_dim, pooler_mode=pool, feature_layout="official")
    sampler.load_state_dict(golden["state_dict"], strict=True)
    return sampler.eval()


def params_from_state_dict(state: dict) -> SamplerParams:
    stages = tuple(
        StageParams(
            state[f"diff_projector_list.{i}.weight"],
            state[f"diff_projector_list.{i}.bias"],
            state[f"agg_projector_list.{i}.net.0.weight"],
            state[f"agg_projector_list.{i}.net.0.bias"],
            state[f"agg_projector_list.{i}.norm.weight"],
            state[f"agg_projector_list.{i}.norm.bias"],
        )
        for i in range(2)
    )
    return SamplerParams(
        stages,
        state["flatten_projector.weight"],
        state["flatten_projector.bias"],
        state["dim_projector.weight"],
        state["dim_projector.bias"],
    )


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error <= RELATIVE_TOLERANCE, f"relative error {error:.3g} > {RELATIVE_TOLERANCE}"


def mask_case_points(golden: dict) -> torch.Tensor:
    return torch.stack([reference.mask_points_nonzero_order(mask, 512) for mask in golden["mask_case_masks"]])


@pytest.mark.parametrize("pool,input_dim,output_dim", CASES)
def test_module_point_features_match_released(pool, input_dim, output_dim):
    golden = load_golden(pool)
    sampler = build_module(golden, pool, input_dim, output_dim)
    with torch.no_grad():
        features = sampler.point_features(golden["feature_maps"], golden["points"], golden["region_image_index"])
    torch.testing.assert_close(features, golden["point_features"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pool,input_dim,output_dim", CASES)
def test_module_forward_points_matches_released(pool, input_dim, output_dim):
    golden = load_golden(pool)
    sampler = build_module(golden, pool, input_dim, output_dim)
    start = torch.zeros(golden["points"].shape[0], dtype=torch.long)
    with torch.no_grad():
        out = sampler.forward_points(golden["points"], golden["point_features"], fps_start=start)
    assert_relative_close(out, golden["expected"])


@pytest.mark.parametrize("pool,input_dim,output_dim", CASES)
def test_module_mask_case_matches_released(pool, input_dim, output_dim):
    golden = load_golden(pool)
    sampler = build_module(golden, pool, input_dim, output_dim)
    masks = golden["mask_case_masks"]
    points = mask_case_points(golden)
    image_index = torch.zeros(len(masks), dtype=torch.long)
    with torch.no_grad():
        features = sampler.point_features(golden["feature_maps"], points, image_index)
        out = sampler.forward_points(points, features, fps_start=0)
    assert_relative_close(out, golden["mask_case_expected"])
    # The random sampler draws the same 512 pixels (in some order) when a mask has exactly 512.
    sampled = sampler.sample_points(masks, generator=torch.Generator().manual_seed(0))
    for drawn, ordered in zip(sampled, points):
        assert torch.equal(torch.unique(drawn, dim=0), torch.unique(ordered, dim=0))


@pytest.mark.parametrize("pool,input_dim,output_dim", CASES)
def test_reference_matches_released(pool, input_dim, output_dim):
    golden = load_golden(pool)
    params = params_from_state_dict(golden["state_dict"])
    assert params.input_dim == input_dim and params.output_dim == output_dim
    features = reference.point_features(golden["feature_maps"], golden["points"], golden["region_image_index"])
    torch.testing.assert_close(features, golden["point_features"], rtol=1e-6, atol=1e-6)
    start = torch.zeros(golden["points"].shape[0], dtype=torch.long)
    out = reference.geo_region_sampler(golden["points"], golden["point_features"], params, pool=pool, fps_start=start)
    assert_relative_close(out, golden["expected"])

    points = mask_case_points(golden)
    image_index = torch.zeros(len(points), dtype=torch.long)
    mask_features = reference.point_features(golden["feature_maps"], points, image_index, layout="official")
    out = reference.geo_region_sampler(points, mask_features, params, pool=pool, fps_start=0)
    assert_relative_close(out, golden["mask_case_expected"])


def test_aligned_layout_does_not_reproduce_released_features():
    """Guards the layout switch: the released weights saw the transposed (official) lookup."""
    golden = load_golden("max")
    aligned = reference.point_features(
        golden["feature_maps"], golden["points"], golden["region_image_index"], layout="aligned"
    )
    assert (aligned - golden["point_features"]).abs().max() > 1e-2
