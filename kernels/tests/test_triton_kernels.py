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

from ferret_kernels import folded, ops, reference  # noqa: E402
from ferret_kernels import _triton, fps, group_pool, knn, mask_points, mask_pool, point_features_kernel, triton_sampler  # noqa: E402
from ferret_kernels.params import SamplerGeometry, SamplerParams, StageParams  # noqa: E402

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
    assert torch.equal(points, folded.sample_mask_points(masks, 32, gen(8)))
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
    kw = dict(geometry=SamplerGeometry((8, 4), (6, 4)), pool=pool, fps_start=torch.tensor([0, 5], device=DEVICE))
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
    kw = dict(geometry=SamplerGeometry((8, 4), (6, 4)), pool="max", fps_start=0)
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


# --------------------------------------------------------------------------- first-contact fixes (issue 14)


class LaunchSpy:
    """Stands in for a kernel: records (grid, args, options) of each launch, then launches the real
    kernel unless `run` is False (outputs then stay uninitialised)."""

    def __init__(self, kernel, run=True, on_launch=None):
        self.kernel, self.run, self.on_launch, self.launches = kernel, run, on_launch, []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.launches.append((tuple(grid), args, options))
            if self.on_launch:
                self.on_launch()
            if self.run:
                self.kernel[grid](*args, **options)

        return launch


def test_group_pool_variance_survives_a_large_mean():
    """Rows of mean ~3000 and spread ~1: E[x^2] - mean^2 loses every digit in fp32; the chunked
    Welford merge matches the fp64 reference."""
    g = gen(30)
    u = torch.randn(1, 12, 96, generator=g, device=DEVICE) + 3000.0
    v = torch.randn(1, 3, 96, generator=g, device=DEVICE)
    index = torch.randint(0, 12, (1, 3, 5), generator=g, device=DEVICE)
    gamma, beta = torch.ones(96, device=DEVICE), torch.zeros(96, device=DEVICE)
    with_blocks = {"BLOCK_C": 32}  # three channel blocks to merge
    _triton.BLOCK_OVERRIDES["group_pool_fwd"] = with_blocks
    try:
        got = group_pool.group_pool(u, v, index, gamma, beta, 1e-5, "max")
    finally:
        _triton.BLOCK_OVERRIDES.pop("group_pool_fwd")
    expected = naive_group_pool(u.double(), v.double(), index, gamma.double(), beta.double(), 1e-5, "max")
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)


def test_group_pool_saves_max_winners_and_small_weight_gradient_partials(monkeypatch):
    """The backward reads the forward's winners (an integer bit mask, no float re-comparison) and
    reduces the LayerNorm weight gradients per program in-kernel, not in [R*M, D] buffers."""
    g = gen(31)
    u = torch.randn(2, 30, 16, generator=g, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 8, 16, generator=g, device=DEVICE, requires_grad=True)
    index = torch.randint(0, 30, (2, 8, 6), generator=g, device=DEVICE)
    gamma = torch.ones(16, device=DEVICE, requires_grad=True)
    beta = torch.zeros(16, device=DEVICE, requires_grad=True)
    out = group_pool.group_pool(u, v, index, gamma, beta, 1e-5, "max")
    saved_ints = [t for t in out.grad_fn.saved_tensors if not t.is_floating_point() and t.shape == (16, 16)]
    assert saved_ints, "no winner mask saved by the forward"
    spy = LaunchSpy(group_pool._group_pool_bwd)
    monkeypatch.setattr(group_pool, "_group_pool_bwd", spy)
    torch.autograd.grad(out.sum(), [u, v, gamma, beta])
    (grid, args, _), = spy.launches
    names = spy.kernel.arg_names
    partials = [a for name, a in zip(names, args) if "gamma" in name and name != "gamma_ptr"]
    assert partials and all(p.shape[0] == grid[0] < 16 for p in partials), [tuple(p.shape) for p in partials]


@pytest.mark.parametrize("op", ["point_features", "group_pool", "mask_pool"])
def test_deterministic_mode_takes_the_atomic_free_path(op, monkeypatch):
    """torch.use_deterministic_algorithms(True): no float-atomic kernel runs, the gradients equal the
    atomic path's (on CPU the atomics are ordered, so the two agree to rounding)."""
    g = gen(32)
    maps = torch.randn(2, 36, 24, generator=g, device=DEVICE, requires_grad=True)
    image_index = torch.tensor([1, 0], device=DEVICE)
    if op == "point_features":
        points = torch.rand(2, 20, 2, generator=g, device=DEVICE)
        module, kernel_name = point_features_kernel, "_point_features_bwd"
        run = lambda: point_features_kernel.point_features(maps, points, image_index)  # noqa: E731
        inputs = [maps]
    elif op == "mask_pool":
        masks = torch.zeros(2, 10, 9, dtype=torch.bool, device=DEVICE)
        masks[0, 1:6, 2:7] = True
        masks[1, 4, 4] = True
        module, kernel_name = mask_pool, "_mask_pool_bwd"
        run = lambda: mask_pool.mask_average_pool(maps, masks, image_index, num_points=None)  # noqa: E731
        inputs = [maps]
    else:
        u = torch.randn(2, 30, 24, generator=g, device=DEVICE, requires_grad=True)
        v = torch.randn(2, 5, 24, generator=g, device=DEVICE, requires_grad=True)
        index = torch.randint(0, 30, (2, 5, 6), generator=g, device=DEVICE)
        gamma = torch.ones(24, device=DEVICE, requires_grad=True)
        beta = torch.zeros(24, device=DEVICE, requires_grad=True)
        module, kernel_name = group_pool, "_group_pool_bwd"
        run = lambda: group_pool.group_pool(u, v, index, gamma, beta, 1e-5, "max")  # noqa: E731
        inputs = [u, v, gamma, beta]
    weight = torch.randn(run().shape, generator=g, device=DEVICE)
    atomic = torch.autograd.grad((run() * weight).sum(), inputs)
    spy = LaunchSpy(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, spy)
    torch.use_deterministic_algorithms(True)
    try:
        exact = torch.autograd.grad((run() * weight).sum(), inputs)
    finally:
        torch.use_deterministic_algorithms(False)
    if op == "group_pool":  # its kernel runs, in the variant that writes rows for index_add_
        assert spy.launches and all(options["DETERMINISTIC"] for _, _, options in spy.launches)
    else:
        assert not spy.launches, "the atomic backward kernel ran in deterministic mode"
    for a, b in zip(exact, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_launch_is_guarded_by_its_tensors_device(monkeypatch):
    active = []

    def guard(tensor):
        import contextlib

        @contextlib.contextmanager
        def scope():
            active.append(tensor.device)
            try:
                yield
            finally:
                active.pop()

        return scope()

    def assert_guarded():
        assert active and active[-1].type == DEVICE.type, "kernel launched outside device_guard(tensor)"

    spies = []
    kernel_type = type(fps._fps_kernel)  # JITFunction, or InterpretedFunction under the interpreter
    for module in (fps, knn, mask_points, point_features_kernel, group_pool, mask_pool):
        monkeypatch.setattr(module, "device_guard", guard)
        for name, value in list(vars(module).items()):
            if isinstance(value, kernel_type) and name.startswith("_") and not name.startswith("__"):
                if any(s in name for s in ("_kernel", "_fwd", "_bwd")):
                    spy = LaunchSpy(value, on_launch=assert_guarded)
                    spies.append(spy)
                    monkeypatch.setattr(module, name, spy)
    g = gen(33)
    xy = torch.rand(1, 16, 2, generator=g, device=DEVICE)
    fps.farthest_point_sample(xy, 4, 0)
    knn.knn_indices(xy[:, :4], xy, 3)
    masks = torch.zeros(1, 6, 5, dtype=torch.bool, device=DEVICE)
    masks[0, 1:4, 1:4] = True
    mask_points.sample_mask_points(masks, 8, g)
    maps = torch.randn(1, 36, 8, generator=g, device=DEVICE, requires_grad=True)
    image_index = torch.zeros(1, dtype=torch.long, device=DEVICE)
    point_features_kernel.point_features(maps, xy, image_index).sum().backward()
    mask_pool.mask_average_pool(maps, masks, image_index, num_points=None).sum().backward()
    u = torch.randn(1, 16, 8, generator=g, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 4, 8, generator=g, device=DEVICE, requires_grad=True)
    group_pool.group_pool(u, v, knn.knn_indices(xy[:, :4], xy, 3), torch.ones(8, device=DEVICE),
                          torch.zeros(8, device=DEVICE), 1e-5, "max").sum().backward()
    assert sum(bool(spy.launches) for spy in spies) == 9


def test_image_index_on_another_device_is_rejected():
    maps = torch.randn(1, 36, 8, device=DEVICE)
    points = torch.rand(1, 4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="share one device"):
        point_features_kernel.point_features(maps, points, torch.zeros(1, dtype=torch.long, device="meta"))
    masks = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="share one device"):
        mask_pool.mask_average_pool(maps, masks, torch.zeros(1, dtype=torch.long, device="meta"))


def test_mask_pool_moves_the_masks_before_checking_devices(monkeypatch):
    """The collator's masks are CPU tensors: on a GPU run they must reach the device before the
    check (the maps sit on `meta` here, standing in for CUDA)."""
    seen = []

    class Stop(Exception):
        pass

    def recording_check(*tensors):
        seen.extend(t.device for t in tensors)
        raise Stop

    monkeypatch.setattr(mask_pool, "check_device", recording_check)
    maps = torch.empty(1, 36, 8, device="meta")
    masks = [torch.ones(5, 4, dtype=torch.bool)]
    with pytest.raises(Stop):
        mask_pool.mask_average_pool(maps, masks, torch.zeros(1, dtype=torch.long, device="meta"))
    assert seen and all(device == maps.device for device in seen), seen


def test_mask_pool_backward_grid_stays_within_cuda_limits(monkeypatch):
    """Every pixel of a 4-megapixel mask: the pixel blocks must sit on grid axis 0 (2^31 - 1), as
    axes 1 and 2 allow 65535 blocks."""
    monkeypatch.setattr(mask_pool, "interpreting", lambda: False, raising=False)  # the GPU's blocks, whatever runs them
    fwd, bwd = LaunchSpy(mask_pool._mask_pool_fwd, run=False), LaunchSpy(mask_pool._mask_pool_bwd, run=False)
    monkeypatch.setattr(mask_pool, "_mask_pool_fwd", fwd)
    monkeypatch.setattr(mask_pool, "_mask_pool_bwd", bwd)
    maps = torch.zeros(1, 36, 8, device=DEVICE, requires_grad=True)
    masks = torch.ones(1, 2048, 2048, dtype=torch.bool, device=DEVICE)
    out = mask_pool.mask_average_pool(maps, masks, torch.zeros(1, dtype=torch.long, device=DEVICE), num_points=None)
    torch.autograd.grad(out, maps, torch.ones_like(out))
    for spy in (fwd, bwd):
        (grid, _, _), = spy.launches
        assert grid[0] < 2**31 and all(size <= 65535 for size in grid[1:]), grid


def test_knn_reference_tile_is_bounded(monkeypatch):
    spy = LaunchSpy(knn._knn_kernel)
    monkeypatch.setattr(knn, "_knn_kernel", spy)
    ref_xy = torch.rand(1, 3000, 2, generator=gen(34), device=DEVICE)
    query = ref_xy[:, :3]
    got = knn.knn_indices(query, ref_xy, 4)
    (_, _, options), = spy.launches
    assert options["BLOCK_N"] <= knn.MAX_BLOCK_N
    assert torch.equal(got, reference.knn_indices(query, ref_xy, 4))


def test_module_samples_mask_points_on_the_maps_device(monkeypatch):
    from ferret.model import sampler as sampler_module

    seen = []

    class Stop(Exception):
        pass

    def recording_sample(masks, num_points, generator=None, backend=None):
        seen.extend(mask.device for mask in masks)
        raise Stop

    monkeypatch.setattr(sampler_module.ops, "sample_mask_points", recording_sample)
    module = sampler_module.GeoRegionSampler(8, 12)
    maps = torch.empty(1, 36, 8, device="meta")
    with pytest.raises(Stop):
        module(maps, [[torch.ones(6, 5, dtype=torch.bool)]])
    assert seen == [maps.device]
