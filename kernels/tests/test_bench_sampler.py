"""pytest-benchmark suite: `pytest kernels/ --benchmark-enable --benchmark-only` times the fast path
against the reference on CPU (the GPU numbers come from bench/gpu_check.sh).

The default pytest config passes --benchmark-disable (hence --benchmark-enable above): then each
test runs its function once on tiny shapes as a smoke test, so the suite stays cheap. With benchmarking on, shapes are the real
per-region ones (width 1024, 512 points, stages 128/32, k 24) on 4 regions.
"""

from __future__ import annotations

import pytest
import torch

from ferret_kernels import folded, ops, reference
from ferret_kernels.params import SamplerGeometry, SamplerParams, StageParams


def _shapes(benchmark):
    if benchmark.disabled:
        return dict(regions=2, points=64, width=32, sub=(16, 8), k=(8, 4))
    return dict(regions=4, points=512, width=1024, sub=(128, 32), k=(24, 24))


def geometry(shape) -> SamplerGeometry:
    return SamplerGeometry(shape["sub"], shape["k"])


def _inputs(shape, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    width, d = shape["width"], shape["width"] + 2

    def rand(*s, scale=None):
        return (torch.randn(*s, generator=gen) * (scale or s[-1] ** -0.5)).requires_grad_(requires_grad)

    stages = tuple(
        StageParams(rand(d, d), rand(d, scale=0.02), rand(width, 2 * d, 1), rand(width, scale=0.02),
                    (1 + 0.1 * torch.randn(width, generator=gen)).requires_grad_(requires_grad), rand(width, scale=0.02))
        for _ in shape["sub"]
    )
    params = SamplerParams(stages, rand(width, shape["sub"][-1] * width), rand(width, scale=0.02), rand(width, width), rand(width, scale=0.02))
    points = torch.rand(shape["regions"], shape["points"], 2, generator=gen)
    features = torch.randn(shape["regions"], shape["points"], width, generator=gen).requires_grad_(requires_grad)
    return points, features, params


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_bench_sampler_forward(benchmark, backend):
    benchmark.group = "sampler forward"
    shape = _shapes(benchmark)
    points, features, params = _inputs(shape)

    def run():
        with torch.no_grad():
            return ops.geo_region_sampler(points, features, params, geometry(shape), fps_start=0, backend=backend)

    out = benchmark(run)
    assert out.shape == (shape["regions"], shape["width"]) and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_bench_sampler_forward_backward(benchmark, backend):
    benchmark.group = "sampler forward+backward"
    shape = _shapes(benchmark)
    points, features, params = _inputs(shape, requires_grad=True)

    def run():
        out = ops.geo_region_sampler(points, features, params, geometry(shape), fps_start=0, backend=backend)
        return torch.autograd.grad(out.sum(), [features, params.stages[0].conv_weight])

    grads = benchmark(run)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_bench_fps(benchmark, impl):
    benchmark.group = "farthest point sampling"
    shape = _shapes(benchmark)
    xy = torch.rand(shape["regions"] * 8, shape["points"], 2, generator=torch.Generator().manual_seed(1))
    fn = folded.farthest_point_sample if impl == "fast" else reference.farthest_point_sample
    idx = benchmark(fn, xy, shape["sub"][0], 0)
    assert idx.shape == (xy.shape[0], shape["sub"][0])


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_bench_group_pool(benchmark, impl):
    benchmark.group = "group pool (stage 1)"
    shape = _shapes(benchmark)
    gen = torch.Generator().manual_seed(2)
    regions, n, m, k, c = shape["regions"], shape["points"], shape["sub"][0], shape["k"][0], shape["width"]
    u, v = torch.randn(regions, n, c, generator=gen), torch.randn(regions, m, c, generator=gen)
    index = torch.randint(0, n, (regions, m, k), generator=gen)
    gamma, beta = torch.ones(c), torch.zeros(c)

    def naive():
        rows = torch.relu(reference.gather_points(u, index) + v.unsqueeze(2))
        return torch.nn.functional.layer_norm(rows, (c,), gamma, beta).amax(2)

    fn = naive if impl == "naive" else (lambda: folded.group_pool(u, v, index, gamma, beta, 1e-5, "max"))
    out = benchmark(fn)
    assert out.shape == (regions, m, c)
