"""CUDA-only properties of the Triton route: no host synchronisation in the sampler forward, and
the forward captured in a CUDA graph replays correctly with new inputs. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sync-debug mode and CUDA graphs)")

WIDTH, OUT, POINTS = 64, 96, 512


def _setup(regions: int = 4, images: int = 2):
    from ferret.model.sampler import GeoRegionSampler

    torch.manual_seed(0)
    sampler = GeoRegionSampler(WIDTH, OUT, pooler_mode="max").cuda()
    maps = torch.randn(images, 576, WIDTH, device="cuda")
    masks = torch.zeros(regions, 120, 90, dtype=torch.bool, device="cuda")
    for r in range(regions):
        masks[r, 5 * r : 5 * r + 40, 3 * r : 3 * r + 30 - 5 * r] = True  # 1200 .. 225 pixels
    image_index = (torch.arange(regions, device="cuda") % images)
    return sampler, maps, masks, image_index


def _pipeline(sampler, maps, masks, image_index, generator):
    from ferret_kernels import ops

    points = ops.sample_mask_points(masks, POINTS, generator)
    features = ops.point_features(maps, points, image_index)
    return ops.geo_region_sampler(points, features, sampler.params(), pool="max", fps_start=None, generator=generator)


def test_sampler_forward_has_no_host_sync():
    sampler, maps, masks, image_index = _setup()
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        _pipeline(sampler, maps, masks, image_index, generator)  # compile the kernels first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = _pipeline(sampler, maps, masks, image_index, generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (masks.shape[0], OUT) and torch.isfinite(out).all()


def test_seeded_generator_gives_reproducible_forward():
    sampler, maps, masks, image_index = _setup()
    with torch.no_grad():
        a = _pipeline(sampler, maps, masks, image_index, torch.Generator(device="cuda").manual_seed(3))
        b = _pipeline(sampler, maps, masks, image_index, torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(a, b)


def test_sampler_forward_captures_in_cuda_graph_and_replays_with_new_inputs():
    from ferret_kernels import ops, reference

    sampler, maps, masks, image_index = _setup()
    params = sampler.params()
    points = reference.sample_mask_points(masks.cpu(), POINTS, torch.Generator().manual_seed(0)).cuda()
    static_points = points.clone()
    static_maps = maps.clone()
    start = torch.zeros(masks.shape[0], dtype=torch.long, device="cuda")

    def forward():
        features = ops.point_features(static_maps, static_points, image_index)
        return ops.geo_region_sampler(static_points, features, params, pool="max", fps_start=start)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # warm-up: Triton compilation and allocator pools outside the capture
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = forward()

    new_points = reference.sample_mask_points(masks.cpu(), POINTS, torch.Generator().manual_seed(1)).cuda()
    new_maps = torch.randn_like(maps)
    static_points.copy_(new_points)
    static_maps.copy_(new_maps)
    graph.replay()
    with torch.no_grad():
        expected = reference.geo_region_sampler(
            new_points, reference.point_features(new_maps, new_points, image_index), params, pool="max", fps_start=start
        )
    torch.testing.assert_close(static_out, expected, rtol=1e-4, atol=1e-4)


def test_bf16_triton_forward_close_to_fp32_reference():
    from ferret_kernels import ops, reference

    sampler, maps, masks, image_index = _setup()
    points = reference.sample_mask_points(masks.cpu(), POINTS, torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected = reference.geo_region_sampler(
            points, reference.point_features(maps, points, image_index), sampler.params(), fps_start=0
        )
        half = sampler.to(torch.bfloat16)
        got = ops.geo_region_sampler(
            points, ops.point_features(maps.bfloat16(), points, image_index), half.params(), fps_start=0
        )
    relative = (got.float() - expected).norm() / expected.norm()
    assert relative < 3e-2, relative
