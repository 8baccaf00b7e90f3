"""Unit tests of the plain-PyTorch reference sampler ops (small hand-checkable cases + brute force)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ferret_kernels import ops, reference
from ferret_kernels.params import SamplerGeometry, SamplerParams, StageParams


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_params(width: int, out_dim: int, last_points: int, stages: int = 2, dtype=torch.float32, seed: int = 0):
    g = seeded(seed)

    def rand(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    stage_list = tuple(
        StageParams(
            rand(width + 2, width + 2),
            rand(width + 2),
            rand(width, 2 * (width + 2), 1),
            rand(width),
            (1 + rand(width, scale=0.1)).detach().requires_grad_(),
            rand(width, scale=0.1),
        )
        for _ in range(stages)
    )
    return SamplerParams(stage_list, rand(width, last_points * width), rand(width), rand(out_dim, width), rand(out_dim))


# --------------------------------------------------------------------------- sample_mask_points


def box_mask(width: int, height: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    mask = torch.zeros(width, height, dtype=torch.bool)  # official (W, H) layout
    mask[x0:x1, y0:y1] = True
    return mask


def pixels_of(points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Invert the normalisation: [N, 2] of (x/W, y/H) -> integer (x, y)."""
    size = torch.tensor(mask.shape, dtype=torch.float32)
    return torch.round(points * size).long()


def test_sampled_points_lie_inside_their_masks():
    masks = [box_mask(40, 30, 3, 5, 20, 9), box_mask(17, 50, 0, 40, 17, 50)]
    points = reference.sample_mask_points(masks, 64, seeded())
    assert points.shape == (2, 64, 2) and points.dtype == torch.float32
    assert ((points >= 0) & (points < 1)).all()
    for region_points, mask in zip(points, masks):
        xy = pixels_of(region_points, mask)
        assert mask[xy[:, 0], xy[:, 1]].all()


def test_sampling_is_without_replacement_when_the_mask_is_large_enough():
    mask = box_mask(30, 30, 0, 0, 10, 10)  # 100 pixels
    points = reference.sample_mask_points([mask], 100, seeded())[0]
    assert torch.unique(points, dim=0).shape[0] == 100
    points = reference.sample_mask_points([mask], 37, seeded())[0]
    assert torch.unique(points, dim=0).shape[0] == 37


def test_sampling_repeats_pixels_when_the_mask_is_small():
    mask = box_mask(30, 30, 4, 4, 7, 6)  # 6 pixels
    points = reference.sample_mask_points([mask], 50, seeded())[0]
    unique = torch.unique(points, dim=0)
    assert unique.shape[0] == 6  # every pixel appears (released: all pixels, then random repeats)
    expected = reference.mask_points_nonzero_order(mask, 6)
    assert torch.equal(points[:6], expected)


def test_same_seed_same_points_and_different_seed_differs():
    masks = torch.stack([box_mask(20, 20, 2, 2, 18, 18), box_mask(20, 20, 0, 0, 5, 5)])  # [R, W, H] form
    first = reference.sample_mask_points(masks, 30, seeded(3))
    again = reference.sample_mask_points(masks, 30, seeded(3))
    other = reference.sample_mask_points(masks, 30, seeded(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_empty_mask_names_its_region():
    masks = [box_mask(10, 10, 0, 0, 3, 3), torch.zeros(10, 10, dtype=torch.bool)]
    with pytest.raises(ValueError, match="region 1"):
        reference.sample_mask_points(masks, 8, seeded())
    with pytest.raises(ValueError, match="region 0"):
        reference.mask_average_pool(torch.randn(1, 4, 3), [masks[1]], torch.zeros(1, dtype=torch.long))


def test_malformed_masks_and_counts_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        reference.sample_mask_points([torch.ones(3, 3, 3, dtype=torch.bool)], 4)
    with pytest.raises(ValueError, match="num_points"):
        reference.sample_mask_points([torch.ones(3, 3, dtype=torch.bool)], 0)
    with pytest.raises(ValueError, match="exactly 5"):
        reference.mask_points_nonzero_order(torch.ones(3, 3, dtype=torch.bool), 5)


def test_nonzero_order_is_the_x_major_pixel_order_normalised_by_width_and_height():
    mask = torch.zeros(4, 2, dtype=torch.bool)  # W=4, H=2
    mask[1, 0] = mask[1, 1] = mask[3, 1] = True
    points = reference.mask_points_nonzero_order(mask, 3)
    assert torch.equal(points, torch.tensor([[0.25, 0.0], [0.25, 0.5], [0.75, 0.5]]))


# --------------------------------------------------------------------------- point_features


def naive_bilinear(grid: torch.Tensor, u: float, v: float) -> torch.Tensor:
    """grid [S, S, C] indexed [row, col]; u = column, v = row in [0, 1] (align_corners=True)."""
    side = grid.shape[0]
    col, row = u * (side - 1), v * (side - 1)
    c0, r0 = min(int(math.floor(col)), side - 2), min(int(math.floor(row)), side - 2)
    fc, fr = col - c0, row - r0
    return (
        grid[r0, c0] * (1 - fc) * (1 - fr)
        + grid[r0, c0 + 1] * fc * (1 - fr)
        + grid[r0 + 1, c0] * (1 - fc) * fr
        + grid[r0 + 1, c0 + 1] * fc * fr
    )


def test_point_features_hand_checked_on_a_two_by_two_map():
    # Row-major 2x2 map with one channel: [[0, 1], [2, 3]] (row = image y, column = image x).
    maps = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    points = torch.tensor([[[0.5, 0.0], [0.0, 0.5], [0.25, 0.75]]])  # (x/W, y/H)
    index = torch.zeros(1, dtype=torch.long)
    aligned = reference.point_features(maps, points, index, layout="aligned")[0, :, 0]
    official = reference.point_features(maps, points, index, layout="official")[0, :, 0]
    # aligned reads value(col=x, row=y) = x + 2y; official reads the transpose, y + 2x.
    torch.testing.assert_close(aligned, torch.tensor([0.5, 1.0, 1.75]))
    torch.testing.assert_close(official, torch.tensor([1.0, 0.5, 1.25]))


def test_point_features_match_a_naive_bilinear_loop():
    g = seeded(1)
    side, channels = 5, 3
    maps = torch.randn(2, side * side, channels, generator=g)
    points = torch.rand(3, 7, 2, generator=g)
    index = torch.tensor([1, 0, 1])
    for layout in ("aligned", "official"):
        got = reference.point_features(maps, points, index, layout=layout)
        for r, n in itertools.product(range(3), range(7)):
            grid = maps[index[r]].reshape(side, side, channels)
            x, y = points[r, n].tolist()
            u, v = (x, y) if layout == "aligned" else (y, x)
            torch.testing.assert_close(got[r, n], naive_bilinear(grid, u, v), rtol=1e-5, atol=1e-6)


def test_layouts_differ_exactly_by_a_transpose_of_the_map():
    g = seeded(2)
    side = 6
    maps = torch.randn(2, side * side, 4, generator=g, dtype=torch.float64)
    transposed = maps.reshape(2, side, side, 4).transpose(1, 2).reshape(2, side * side, 4)
    points = torch.rand(4, 9, 2, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 1, 1, 0])
    official = reference.point_features(maps, points, index, layout="official")
    # Equal up to the rounding order of the two interpolation axes.
    transposed_aligned = reference.point_features(transposed, points, index, layout="aligned")
    torch.testing.assert_close(official, transposed_aligned, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(official, reference.point_features(maps, points, index, layout="aligned"))


def test_point_features_compute_in_fp32_and_return_the_feature_dtype():
    g = seeded(3)
    maps = torch.randn(1, 16, 8, generator=g).to(torch.bfloat16)
    points = torch.rand(2, 5, 2, generator=g)
    index = torch.zeros(2, dtype=torch.long)
    got = reference.point_features(maps, points, index)
    assert got.dtype == torch.bfloat16
    expected = reference.point_features(maps.float(), points, index).to(torch.bfloat16)
    assert torch.equal(got, expected)


def test_point_features_reject_bad_inputs():
    points = torch.rand(1, 3, 2)
    index = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="square"):
        reference.point_features(torch.randn(1, 10, 2), points, index)
    with pytest.raises(ValueError, match="layout"):
        reference.point_features(torch.randn(1, 9, 2), points, index, layout="diagonal")
    with pytest.raises(ValueError, match="image_index"):
        reference.point_features(torch.randn(1, 9, 2), points, torch.tensor([1]))
    with pytest.raises(ValueError, match="points"):
        reference.point_features(torch.randn(1, 9, 2), torch.rand(1, 3, 3), index)


# --------------------------------------------------------------------------- farthest point sampling


def naive_fps(points: list[tuple[float, float]], count: int, start: int) -> list[int]:
    chosen = [start]
    nearest = [math.inf] * len(points)
    while len(chosen) < count:
        ax, ay = points[chosen[-1]]
        for i, (x, y) in enumerate(points):
            nearest[i] = min(nearest[i], (x - ax) ** 2 + (y - ay) ** 2)
        best = max(range(len(points)), key=lambda i: (nearest[i], -i))  # ties -> lowest index
        chosen.append(best)
    return chosen


def test_fps_hand_checked_on_a_line():
    xy = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0]]])
    assert reference.farthest_point_sample(xy, 4, torch.tensor([0])).tolist() == [[0, 3, 2, 1]]
    assert reference.farthest_point_sample(xy, 2, 3).tolist() == [[3, 0]]


def test_fps_matches_a_naive_loop():
    g = seeded(5)
    xy = torch.rand(3, 40, 2, generator=g)
    start = torch.tensor([0, 17, 39])
    got = reference.farthest_point_sample(xy, 12, start)
    for r in range(3):
        assert got[r].tolist() == naive_fps([tuple(p) for p in xy[r].tolist()], 12, int(start[r]))


def test_fps_breaks_ties_towards_the_lowest_index():
    # A 4x4 pixel grid: many equal distances.
    xy = torch.tensor([[(x, y) for x in range(4) for y in range(4)]], dtype=torch.float32)
    got = reference.farthest_point_sample(xy, 10, 5)
    assert got[0].tolist() == naive_fps([tuple(p) for p in xy[0].tolist()], 10, 5)


def test_fps_random_start_comes_from_the_generator():
    xy = torch.rand(4, 30, 2, generator=seeded(6))
    first = reference.farthest_point_sample(xy, 5, None, seeded(9))
    assert torch.equal(first, reference.farthest_point_sample(xy, 5, None, seeded(9)))
    starts = {tuple(reference.farthest_point_sample(xy, 1, None, seeded(s))[:, 0].tolist()) for s in range(5)}
    assert len(starts) > 1
    with pytest.raises(ValueError, match="num_samples"):
        reference.farthest_point_sample(xy, 31, 0)


# --------------------------------------------------------------------------- kNN


def test_knn_matches_a_full_sort_on_continuous_points():
    g = seeded(7)
    query, ref = torch.rand(2, 6, 2, generator=g), torch.rand(2, 50, 2, generator=g)
    got = reference.knn_indices(query, ref, 8)
    distance = ((query[:, :, None] - ref[:, None]) ** 2).sum(-1)
    assert torch.equal(got, distance.argsort(dim=-1)[..., :8])


def test_knn_hand_checked():
    ref = torch.tensor([[[0.0, 0.0], [5.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    query = torch.tensor([[[0.0, 0.1], [4.0, 0.0]]])
    assert reference.knn_indices(query, ref, 2).tolist() == [[[0, 2], [1, 2]]]


def test_knn_on_a_pixel_grid_keeps_every_strictly_nearer_point_and_orders_by_distance():
    xy = torch.tensor([[(x, y) for x in range(6) for y in range(6)]], dtype=torch.float32) / 6
    query = xy[:, [0, 14, 35]]
    got = reference.knn_indices(query, xy, 7)
    distance = reference.squared_distances(query, xy)
    chosen = distance.gather(-1, got)
    assert (chosen[..., 1:] >= chosen[..., :-1]).all()  # nearest first
    kth = chosen[..., -1:]
    for m in range(3):
        strictly_nearer = set((distance[0, m] < kth[0, m]).nonzero().flatten().tolist())
        assert strictly_nearer <= set(got[0, m].tolist())
        assert len(set(got[0, m].tolist())) == 7
    assert got[0, 0, 0] == 0 and got[0, 1, 0] == 14  # a query that is a point finds itself first


# --------------------------------------------------------------------------- sampler stage / full sampler


def naive_stage(xy, features, stage: StageParams, sub: int, k: int, pool: str, start: int):
    """Per-region, per-anchor loop built on nn modules (released ConvReLULN1D order: conv, ReLU, LN)."""
    width = features.shape[-1]
    diff = torch.nn.Linear(width + 2, width + 2)
    conv = torch.nn.Conv1d(2 * (width + 2), width, 1)
    norm = torch.nn.LayerNorm(width, eps=stage.ln_eps)
    with torch.no_grad():
        diff.weight.copy_(stage.diff_weight), diff.bias.copy_(stage.diff_bias)
        conv.weight.copy_(stage.conv_weight), conv.bias.copy_(stage.conv_bias)
        norm.weight.copy_(stage.ln_weight), norm.bias.copy_(stage.ln_bias)
    out_xy, out_features = [], []
    for r in range(xy.shape[0]):
        anchors = naive_fps([tuple(p) for p in xy[r].tolist()], sub, start)
        rows = torch.cat([features[r], xy[r]], dim=-1)
        region_features = []
        for a in anchors:
            distance = ((xy[r] - xy[r, a]) ** 2).sum(-1)
            neighbours = distance.argsort()[:k]
            diffs = diff(rows[neighbours] - rows[a])
            stacked = torch.cat([diffs, rows[a].expand_as(diffs)], dim=-1)  # [k, 2(D+2)]
            hidden = norm(torch.relu(conv(stacked.T.unsqueeze(0)))[0].T)  # [k, D]
            region_features.append(hidden.max(0).values if pool == "max" else hidden.mean(0))
        out_xy.append(xy[r, anchors])
        out_features.append(torch.stack(region_features))
    return torch.stack(out_xy), torch.stack(out_features)


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_sampler_stage_matches_a_naive_loop(pool):
    g = seeded(8)
    xy, features = torch.rand(2, 20, 2, generator=g), torch.randn(2, 20, 5, generator=g)
    stage = random_params(5, 3, 4).stages[0]
    got_xy, got = reference.sampler_stage(xy, features, stage, 6, 4, pool, fps_start=2)
    want_xy, want = naive_stage(xy, features, stage, 6, 4, pool, start=2)
    assert torch.equal(got_xy, want_xy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_max_and_mean_pooling():
    g = seeded(9)
    xy, features = torch.rand(2, 24, 2, generator=g), torch.randn(2, 24, 4, generator=g)
    stage = random_params(4, 3, 4).stages[0]
    _, pooled_max = reference.sampler_stage(xy, features, stage, 8, 5, "max", 0)
    _, pooled_mean = reference.sampler_stage(xy, features, stage, 8, 5, "mean", 0)
    assert (pooled_max >= pooled_mean - 1e-6).all() and not torch.allclose(pooled_max, pooled_mean)
    # With a single neighbour (the anchor itself) both pools see one row and agree.
    _, single_max = reference.sampler_stage(xy, features, stage, 8, 1, "max", 0)
    _, single_mean = reference.sampler_stage(xy, features, stage, 8, 1, "mean", 0)
    torch.testing.assert_close(single_max, single_mean)
    with pytest.raises(ValueError, match="pool"):
        reference.sampler_stage(xy, features, stage, 8, 5, "sum", 0)


def test_geo_region_sampler_composes_the_stages():
    g = seeded(10)
    xy, features = torch.rand(3, 32, 2, generator=g), torch.randn(3, 32, 4, generator=g)
    params = random_params(4, 6, 4)
    out = reference.geo_region_sampler(xy, features, params, SamplerGeometry((8, 4), (5, 3)), "max", fps_start=1)
    assert out.shape == (3, 6)
    stage_xy, hidden = reference.sampler_stage(xy, features, params.stages[0], 8, 5, "max", 1)
    _, hidden = reference.sampler_stage(stage_xy, hidden, params.stages[1], 4, 3, "max", 1)
    flat = torch.nn.functional.linear(hidden.flatten(1), params.flatten_weight, params.flatten_bias)
    torch.testing.assert_close(out, torch.nn.functional.linear(flat, params.dim_weight, params.dim_bias))
    # An int start and a per-region tensor start agree; a random start is seeded.
    geometry = SamplerGeometry((8, 4), (5, 3))
    assert torch.equal(out, reference.geo_region_sampler(xy, features, params, geometry, "max", torch.ones(3, dtype=torch.long)))
    a = reference.geo_region_sampler(xy, features, params, SamplerGeometry((8, 4), (5, 3)), "max", None, seeded(1))
    assert torch.equal(a, reference.geo_region_sampler(xy, features, params, SamplerGeometry((8, 4), (5, 3)), "max", None, seeded(1)))


def test_geo_region_sampler_rejects_inconsistent_inputs():
    xy, features = torch.rand(2, 16, 2), torch.randn(2, 16, 4)
    params = random_params(4, 6, 4)
    with pytest.raises(ValueError, match="width"):
        reference.geo_region_sampler(xy, torch.randn(2, 16, 5), params, SamplerGeometry((8, 4), (5, 3)))
    with pytest.raises(ValueError, match="stage 0"):
        reference.geo_region_sampler(xy, features, params, SamplerGeometry((20, 4), (5, 3)))
    with pytest.raises(ValueError, match="flatten_weight"):
        reference.geo_region_sampler(xy, features, params, SamplerGeometry((8, 2), (5, 3)))
    with pytest.raises(ValueError, match="match points"):
        reference.geo_region_sampler(xy, features[:, :10], params, SamplerGeometry((8, 4), (5, 3)))


def test_gradcheck_in_float64():
    g = seeded(11)
    xy = torch.rand(2, 12, 2, generator=g, dtype=torch.float64).requires_grad_()
    features = torch.randn(2, 12, 3, generator=g, dtype=torch.float64).requires_grad_()
    params = random_params(3, 2, 3, dtype=torch.float64)
    leaves = [t for stage in params.stages for t in stage[:6]]
    leaves += [params.flatten_weight, params.flatten_bias, params.dim_weight, params.dim_bias]

    def run(xy, features, *weights):
        stages = tuple(StageParams(*weights[i * 6 : i * 6 + 6]) for i in range(2))
        bundle = SamplerParams(stages, *weights[12:])
        return reference.geo_region_sampler(xy, features, bundle, SamplerGeometry((6, 3), (4, 3)), "max", fps_start=0)

    assert torch.autograd.gradcheck(run, (xy, features, *leaves), eps=1e-6, atol=1e-5)

    maps = torch.randn(2, 9, 2, generator=g, dtype=torch.float64).requires_grad_()
    points = torch.rand(3, 4, 2, generator=g, dtype=torch.float64).requires_grad_()
    index = torch.tensor([1, 0, 1])
    assert torch.autograd.gradcheck(lambda m, p: reference.point_features(m, p, index), (maps, points))


# --------------------------------------------------------------------------- mask average pool


def test_mask_average_pool_averages_the_bilinear_features_over_the_mask():
    g = seeded(12)
    maps = torch.randn(2, 16, 3, generator=g)
    masks = [box_mask(12, 10, 1, 2, 5, 4), box_mask(12, 10, 6, 0, 12, 10)]
    index = torch.tensor([1, 0])
    pooled = reference.mask_average_pool(maps, masks, index, num_points=None)
    for r, mask in enumerate(masks):
        points = reference.mask_points_nonzero_order(mask, int(mask.sum()))
        expected = reference.point_features(maps, points[None], index[r : r + 1])[0].mean(0)
        torch.testing.assert_close(pooled[r], expected)
    # A constant map pools to that constant, whatever the mask; subsampling is seeded.
    constant = torch.full((1, 16, 2), 0.75)
    many = reference.mask_average_pool(constant, masks, torch.zeros(2, dtype=torch.long), num_points=4, generator=seeded())
    torch.testing.assert_close(many, torch.full((2, 2), 0.75))
    a = reference.mask_average_pool(maps, masks, index, num_points=5, generator=seeded(1))
    assert torch.equal(a, reference.mask_average_pool(maps, masks, index, num_points=5, generator=seeded(1)))
    assert not torch.isnan(a).any()


# --------------------------------------------------------------------------- dispatch


def test_ops_backend_selection(monkeypatch):
    assert ops.resolve_backend("Reference") == "reference"
    monkeypatch.setenv(ops.BACKEND_ENV, "fast")
    assert ops.resolve_backend() == "fast"
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="cuda-magic"):
        ops.resolve_backend()
    monkeypatch.delenv(ops.BACKEND_ENV)
    assert ops.resolve_backend() == "auto"
    xy = torch.rand(1, 10, 2, generator=seeded())
    assert torch.equal(ops.farthest_point_sample(xy, 4, 0, backend="reference"), reference.farthest_point_sample(xy, 4, 0))
