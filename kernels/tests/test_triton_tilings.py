"""The Triton kernels at the tilings a GPU runs, against the plain-PyTorch reference, in fp32 and bf16,
forward and backward. Natively on CUDA when present, else under Triton's interpreter on CPU.

The launchers pick the same blocks under the interpreter as on a GPU; the shapes here make those
blocks tile: C = 1024 is several channel blocks (128 forward, 64 in the scatter backwards), C = 300
leaves a partial last block, 40 points / 67 mask pixels leave partial point blocks, kNN's N = 500
reference points and M = 100 queries leave a partial reference tile and query block, k = 24 pads
BLOCK_K = 32. `_triton.BLOCK_OVERRIDES` injects smaller blocks where the GPU choice would be one
block at these sizes. The other dimensions are kept small: the interpreter costs ~15 ms per program.

Tolerances (inputs rounded to the dtype first; the reference then runs in fp32 on those values):
  fp32: outputs rtol 1e-5 / atol 1e-5; gradients within 1e-4 of the largest reference gradient.
  bf16: outputs and gradients within 2e-2 (rtol and atol): the kernels accumulate in fp32 and
        round once to bf16 (2^-8 relative), the reference rounds each op.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from ferret_kernels import _triton, group_pool, knn, mask_pool, point_features_kernel, reference  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": dict(rtol=1e-5, atol=1e-5), "bf16": dict(rtol=2e-2, atol=2e-2)}
GRAD_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def leaf(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).detach().requires_grad_()


def assert_grads_close(got, expected, dtype_name: str) -> None:
    for i, (a, b) in enumerate(zip(got, expected)):
        scale = b.abs().max().clamp_min(1e-6)
        error = ((a.float() - b.float()).abs().max() / scale).item()
        assert error < GRAD_TOLERANCE[dtype_name], f"gradient {i}: relative error {error:.3g}"


# --------------------------------------------------------------------------- point features


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("channels", [1024, 300])
def test_point_features_gpu_tiling(dtype_name, channels):
    dtype = DTYPES[dtype_name]
    maps = leaf(torch.randn(2, 36, channels, generator=gen(1), device=DEVICE), dtype)
    points = torch.rand(1, 40, 2, generator=gen(2), device=DEVICE)  # 32 + 8 forward, 16 + 16 + 8 backward
    image_index = torch.tensor([1], device=DEVICE)
    got = point_features_kernel.point_features(maps, points, image_index)
    maps32 = maps.detach().float().requires_grad_()
    expected = reference.point_features(maps32, points, image_index)
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype_name])
    weight = torch.randn(got.shape, generator=gen(3), device=DEVICE)
    grads = torch.autograd.grad((got.float() * weight).sum(), maps)
    expected_grads = torch.autograd.grad((expected * weight).sum(), maps32)
    assert_grads_close(grads, expected_grads, dtype_name)


# --------------------------------------------------------------------------- group pool


def naive_group_pool(u, v, index, gamma, beta, eps, pool):
    rows = torch.relu(reference.gather_points(u, index) + v.unsqueeze(2))
    normed = torch.nn.functional.layer_norm(rows, rows.shape[-1:], gamma, beta, eps)
    return normed.amax(2) if pool == "max" else normed.mean(2)


def group_pool_inputs(channels, points, anchors, k, dtype, seed=4):
    g = gen(seed)
    u = torch.randn(1, points, channels, generator=g, device=DEVICE)
    v = torch.randn(1, anchors, channels, generator=g, device=DEVICE)
    index = torch.stack([torch.randperm(points, generator=g, device=DEVICE)[:k] for _ in range(anchors)]).view(1, anchors, k)
    gamma = 1 + 0.1 * torch.randn(channels, generator=g, device=DEVICE)
    beta = 0.1 * torch.randn(channels, generator=g, device=DEVICE)
    return [leaf(t, dtype) for t in (u, v)] + [index] + [leaf(t, dtype) for t in (gamma, beta)]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("channels,anchors", [(1024, 8), (300, 6)])
def test_group_pool_gpu_tiling(dtype_name, channels, anchors):
    """C = 1024: 8 forward / 16 backward channel blocks; C = 300: a partial last block; k = 24 in 32."""
    dtype = DTYPES[dtype_name]
    u, v, index, gamma, beta = group_pool_inputs(channels, 500, anchors, 24, dtype)
    got = group_pool.group_pool(u, v, index, gamma, beta, 1e-5, "max")
    inputs32 = [t.detach().float().requires_grad_() for t in (u, v, gamma, beta)]
    expected = naive_group_pool(inputs32[0], inputs32[1], index, inputs32[2], inputs32[3], 1e-5, "max")
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype_name])
    weight = torch.randn(got.shape, generator=gen(5), device=DEVICE)
    grads = torch.autograd.grad((got.float() * weight).sum(), [u, v, gamma, beta])
    expected_grads = torch.autograd.grad((expected * weight).sum(), inputs32)
    assert_grads_close(grads, expected_grads, dtype_name)


# --------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("blocks", [None, dict(BLOCK_N=128, BLOCK_Q=32)], ids=["gpu-blocks", "tails"])
def test_knn_tiles_reference_points(blocks, monkeypatch):
    """N = 500 over 2 tiles of 256 (GPU choice) or 4 of 128 with a partial last tile and a partial
    query block (M = 100 = 3 x 32 + 4): same neighbours, same order as the reference."""
    if blocks:
        monkeypatch.setitem(_triton.BLOCK_OVERRIDES, "knn", blocks)
    ref_xy = torch.rand(1, 500, 2, generator=gen(6), device=DEVICE)
    query = torch.rand(1, 100, 2, generator=gen(7), device=DEVICE)
    assert torch.equal(knn.knn_indices(query, ref_xy, 24), reference.knn_indices(query, ref_xy, 24))


def test_knn_ties_order_by_distance_then_index(monkeypatch):
    """Pixel-grid points tie exactly: picks are the (distance, index)-smallest, tile by tile."""
    monkeypatch.setitem(_triton.BLOCK_OVERRIDES, "knn", dict(BLOCK_N=64, BLOCK_Q=16))
    ref_xy = (torch.rand(1, 300, 2, generator=gen(8), device=DEVICE) * 16).round() / 16
    query = ref_xy[:, :40].clone()
    got = knn.knn_indices(query, ref_xy, 24)
    distance = reference.squared_distances(query, ref_xy)
    # Lexicographic (distance, index) order via a stable sort on distance of index-ordered columns.
    order = distance.sort(dim=-1, stable=True).indices[..., :24]
    assert torch.equal(got, order)
    assert torch.equal(distance.gather(2, got), distance.gather(2, reference.knn_indices(query, ref_xy, 24)))


# --------------------------------------------------------------------------- mask pool


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("channels", [1024, 300])
def test_mask_pool_gpu_tiling(dtype_name, channels):
    """Masks of 60 and 7 pixels (< 64 points: every pixel once): 16-pixel blocks with a partial
    last one; C as above."""
    dtype = DTYPES[dtype_name]
    maps = leaf(torch.randn(2, 36, channels, generator=gen(9), device=DEVICE), dtype)
    masks = torch.zeros(2, 30, 25, dtype=torch.bool, device=DEVICE)
    masks[0, 2:12, 0:6] = True  # 60 pixels
    masks[1, 5:12, 10] = True  # 7 pixels
    index = torch.tensor([1, 0], device=DEVICE)
    got = mask_pool.mask_average_pool(maps, masks, index, num_points=64)
    maps32 = maps.detach().float().requires_grad_()
    expected = reference.mask_average_pool(maps32, masks, index, num_points=64)
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype_name])
    weight = torch.randn(got.shape, generator=gen(10), device=DEVICE)
    grads = torch.autograd.grad((got.float() * weight).sum(), maps)
    expected_grads = torch.autograd.grad((expected * weight).sum(), maps32)
    assert_grads_close(grads, expected_grads, dtype_name)
