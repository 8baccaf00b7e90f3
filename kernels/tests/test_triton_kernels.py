"""Triton kernels against the reference: natively on CUDA when present, else on CPU under Triton's
interpreter (TRITON_INTERPRET=1, set here before any kernel module imports triton). Shapes are
small: the interpreter costs milliseconds per loop iteration per program."""

from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from ferret_kernels import fast, ops, reference  # noqa: E402
from ferret_kernels import fps, group_pool, knn, mask_points, mask_pool, point_features_kernel, triton_sampler  # noqa: E402
from ferret_kernels.params import SamplerParams, StageParams  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# --------------------------------------------------------------------------- FPS


def test_triton_fps_matches_reference_with_explicit_starts():
    xy = torch.rand(3, 64, 2, generator=gen(0), device=DEVICE)
    start = torch.tensor([0, 17, 63], device=DEVICE)
    got = fps.farthest_point_sample(xy, 16, start)
    assert torch.equal(got, reference.farthest_point_sample(xy, 16, start))
    assert torch.equal(got[:, 0], start)


@pytest.mark.parametrize("num_points,num_samples", [(512, 128), (128, 32)])
def test_triton_fps_matches_reference_at_sampler_sizes(num_points, num_samples):
    xy = torch.rand(1, num_points, 2, generator=gen(20), device=DEVICE)
    start = torch.tensor([3], device=DEVICE)
    assert torch.equal(fps.farthest_point_sample(xy, num_samples, start), reference.farthest_point_sample(xy, num_samples, start))


def test_triton_fps_ties_go_to_lowest_index_and_random_start_is_seeded():
    # A 4x4 lattice: many exact distance ties; the reference's argmax picks the first.
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).view(1, 16, 2) / 4
    grid = grid.to(DEVICE)
    assert torch.equal(fps.farthest_point_sample(grid, 6, 0), reference.farthest_point_sample(grid, 6, 0))
    xy = torch.rand(2, 40, 2, generator=gen(1), device=DEVICE)
    a = fps.farthest_point_sample(xy, 5, None, gen(7))
    b = reference.farthest_point_sample(xy, 5, None, gen(7))
    assert torch.equal(a, b)


def test_triton_fps_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_samples"):
        fps.farthest_point_sample(torch.rand(1, 4, 2, device=DEVICE), 5, 0)


# --------------------------------------------------------------------------- kNN


def test_triton_knn_matches_reference_sets_and_order():
    ref_xy = torch.rand(2, 64, 2, generator=gen(2), device=DEVICE)
    query = ref_xy[:, :16] + 0.01
    got = knn.knn_indices(query, ref_xy, 8)
    assert torch.equal(got, reference.knn_indices(query, ref_xy, 8))
    with pytest.raises(ValueError, match="k must be"):
        knn.knn_indices(query, ref_xy, 65)


# --------------------------------------------------------------------------- bilinear features


@pytest.mark.parametrize("layout", ["official", "aligned"])
def test_triton_point_features_match_reference_with_grad(layout):
    maps = torch.randn(2, 36, 24, generator=gen(3), device=DEVICE, requires_grad=True)
    points = torch.rand(3, 40, 2, generator=gen(4), device=DEVICE)
    points[0, 0] = 0.0  # grid corner
    image_index = torch.tensor([1, 0, 1], device=DEVICE)
    got = point_features_kernel.point_features(maps, points, image_index, layout)
    expected = reference.point_features(maps, points, image_index, layout)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn(got.shape, generator=gen(5), device=DEVICE)
    g_got, = torch.autograd.grad((got * weight).sum(), maps)
    g_exp, = torch.autograd.grad((expected * weight).sum(), maps)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- fused group pool


def naive_group_pool(u, v, index, gamma, beta, eps, pool):
    rows = torch.relu(reference.gather_points(u, index) + v.unsqueeze(2))
    normed = torch.nn.functional.layer_norm(rows, rows.shape[-1:], gamma, beta, eps)
    return normed.amax(2) if pool == "max" else normed.mean(2)


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_triton_group_pool_forward_backward_match_naive(pool):
    g = gen(6)
    u = torch.randn(2, 40, 20, generator=g, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 6, 20, generator=g, device=DEVICE, requires_grad=True)
    index = torch.stack([torch.randperm(40, generator=g, device=DEVICE)[:5] for _ in range(12)]).view(2, 6, 5)
    gamma = (1 + 0.1 * torch.randn(20, generator=g, device=DEVICE)).requires_grad_()
    beta = torch.randn(20, generator=g, device=DEVICE, requires_grad=True)
    got = group_pool.group_pool(u, v, index, gamma, beta, 1e-5, pool)
    expected = naive_group_pool(u, v, index, gamma, beta, 1e-5, pool)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn(got.shape, generator=g, device=DEVICE)
    grads = torch.autograd.grad((got * weight).sum(), [u, v, gamma, beta])
    grads_expected = torch.autograd.grad((expected * weight).sum(), [u, v, gamma, beta])
    for name, a, b in zip(["u", "v", "gamma", "beta"], grads, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_triton_group_pool_max_ties_split_like_amax():
    u = torch.randn(1, 5, 8, device=DEVICE)
    u[0, 2] = u[0, 0]
    u.requires_grad_()
    v = torch.randn(1, 1, 8, device=DEVICE, requires_grad=True)
    index = torch.tensor([[[0, 2, 4]]], device=DEVICE)
    gamma, beta = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    got = group_pool.group_pool(u, v, index, gamma, beta, 1e-5, "max")
    expected = naive_group_pool(u, v, index, gamma, beta, 1e-5, "max")
    g_got, = torch.autograd.grad(got.sum(), u)
    g_exp, = torch.autograd.grad(expected.sum(), u)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- masks


def test_triton_mask_points_contract_and_agreement_with_fast():
    masks = torch.zeros(3, 20, 15, dtype=torch.bool, device=DEVICE)
    masks[0, 3:9, 2:12] = True  # 60 pixels >= N
    masks[1, 5, 5] = masks[1, 6, 9] = masks[1, 19, 14] = True  # 3 pixels < N
    masks[2, ::2, ::3] = True
    points = mask_points.sample_mask_points(masks, 32, gen(8))
    # Same generator state -> same draws as the fast path (they share the pixel choice).
    assert torch.equal(points, fast.sample_mask_points(masks, 32, gen(8)))
    pixels = (points * torch.tensor([20.0, 15.0], device=DEVICE)).round().long()
    for region in range(3):
        assert masks[region][pixels[region, :, 0], pixels[region, :, 1]].all()
    assert torch.unique(pixels[0], dim=0).shape[0] == 32
    assert torch.equal(pixels[1, :3], masks[1].nonzero())
    assert torch.equal(points, mask_points.sample_mask_points(masks, 32, gen(8)))


def test_triton_mask_average_pool_matches_reference():
    maps = torch.randn(2, 36, 16, generator=gen(9), device=DEVICE, requires_grad=True)
    masks = torch.zeros(2, 12, 9, dtype=torch.bool, device=DEVICE)
    masks[0, 2:5, 3:6] = True
    masks[1, 7, 1] = True
    index = torch.tensor([1, 0], device=DEVICE)
    got = mask_pool.mask_average_pool(maps, masks, index, num_points=None)
    expected = reference.mask_average_pool(maps, masks, index, num_points=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    g_got, = torch.autograd.grad(got.sum(), maps)
    g_exp, = torch.autograd.grad(expected.sum(), maps)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- whole sampler


def small_params(width: int, out_dim: int, last: int) -> SamplerParams:
    g = gen(10)
    d = width + 2

    def rand(*shape, scale=None):
        return (torch.randn(*shape, generator=g, device=DEVICE) * (scale or shape[-1] ** -0.5)).requires_grad_()

    stages = tuple(
        StageParams(rand(d, d), rand(d, scale=0.1), rand(width, 2 * d, 1), rand(width, scale=0.1),
                    (1 + 0.1 * torch.randn(width, generator=g, device=DEVICE)).requires_grad_(), rand(width, scale=0.1))
        for _ in range(2)
    )
    return SamplerParams(stages, rand(width, last * width), rand(width, scale=0.1), rand(out_dim, width), rand(out_dim, scale=0.1))


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_triton_sampler_matches_reference_values_and_grads(pool):
    width = 16
    params = small_params(width, 12, 4)
    points = torch.rand(2, 32, 2, generator=gen(11), device=DEVICE).requires_grad_()
    features = torch.randn(2, 32, width, generator=gen(12), device=DEVICE).requires_grad_()
    kw = dict(num_sub_point=(8, 4), num_neighbor=(6, 4), pool=pool, fps_start=torch.tensor([0, 5], device=DEVICE))
    inputs = [points, features, *[t for s in params.stages for t in s[:6]],
              params.flatten_weight, params.flatten_bias, params.dim_weight, params.dim_bias]
    got = ops.geo_region_sampler(points, features, params, backend="triton", **kw)
    expected = reference.geo_region_sampler(points, features, params, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn(got.shape, generator=gen(13), device=DEVICE)
    grads = torch.autograd.grad((got * weight).sum(), inputs)
    grads_expected = torch.autograd.grad((expected * weight).sum(), inputs)
    for i, (a, b) in enumerate(zip(grads, grads_expected)):
        scale = b.abs().max().clamp_min(1e-6)
        assert ((a - b).abs().max() / scale) < 1e-4, f"input {i}: relative grad error {((a - b).abs().max() / scale).item()}"


def test_triton_sampler_from_maps_matches_reference():
    width = 16
    params = small_params(width, 12, 4)
    maps = torch.randn(2, 36, width, generator=gen(14), device=DEVICE, requires_grad=True)
    points = torch.rand(3, 32, 2, generator=gen(15), device=DEVICE)
    image_index = torch.tensor([1, 0, 1], device=DEVICE)
    kw = dict(num_sub_point=(8, 4), num_neighbor=(6, 4), pool="max", fps_start=0)
    got = ops.geo_region_sampler_from_maps(maps, points, image_index, params, backend="triton", **kw)
    expected = reference.geo_region_sampler(points, reference.point_features(maps, points, image_index), params, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    g_got, = torch.autograd.grad(got.sum(), maps)
    g_exp, = torch.autograd.grad(expected.sum(), maps)
    assert ((g_got - g_exp).abs().max() / g_exp.abs().max()) < 1e-4


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if ON_CUDA:
        pytest.skip("the CPU-tensor error only concerns machines where the kernels are interpreted")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fps.farthest_point_sample(torch.rand(1, 8, 2), 2, 0)
