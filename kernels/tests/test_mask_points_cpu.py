"""The CPU mask sampler (ferret_kernels.mask_points_cpu) draws exactly what the reference draws,
leaves the generator where the reference leaves it, and never lists a large mask's pixels."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ferret_kernels import mask_points_cpu, ops, reference


@pytest.fixture
def unlisted(monkeypatch):
    """Every mask goes the row-count way, however small (by default small ones are listed)."""
    monkeypatch.setattr(mask_points_cpu, "LISTED_MASK_PIXELS", 0)


def _random_masks(seed: int) -> list[torch.Tensor]:
    """A few (W, H) masks of one random size: random density, one pixel, full, a single row."""
    gen = torch.Generator().manual_seed(seed)
    width, height = (int(v) for v in torch.randint(1, 48, (2,), generator=gen))
    density = float(torch.rand((), generator=gen))
    sparse = torch.rand(width, height, generator=gen) < density
    sparse[int(torch.randint(0, width, (), generator=gen)), 0] = True  # never empty
    one_pixel = torch.zeros(width, height, dtype=torch.bool)
    one_pixel[int(torch.randint(0, width, (), generator=gen)), int(torch.randint(0, height, (), generator=gen))] = True
    one_row = torch.zeros(width, height, dtype=torch.bool)
    one_row[width - 1] = True
    return [sparse, one_pixel, torch.ones(width, height, dtype=torch.bool), one_row]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("num_points", [1, 5, 64, 512])
def test_same_points_and_generator_state_as_the_reference(seed, num_points, unlisted):
    masks = _random_masks(seed)
    ours_gen, ref_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ours = mask_points_cpu.sample_mask_points(masks, num_points, ours_gen)
    expected = reference.sample_mask_points(masks, num_points, ref_gen)
    assert torch.equal(ours, expected)
    assert torch.equal(ours_gen.get_state(), ref_gen.get_state())  # later draws (FPS starts) unchanged


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_points", [1, 7, 512, None])
def test_mask_average_pool_same_as_the_reference(seed, num_points, unlisted):
    masks = _random_masks(seed)
    maps = torch.randn(2, 16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    index = torch.tensor([0, 1, 1, 0])
    ours_gen, ref_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ours = mask_points_cpu.mask_average_pool(maps, masks, index, num_points, "official", ours_gen)
    expected = reference.mask_average_pool(maps, masks, index, num_points, "official", ref_gen)
    assert torch.equal(ours, expected)
    assert torch.equal(ours_gen.get_state(), ref_gen.get_state())


def test_the_default_generator_is_used_like_the_reference(unlisted):
    masks = _random_masks(3)
    torch.manual_seed(11)
    ours = mask_points_cpu.sample_mask_points(masks, 100)
    after_ours = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(ours, reference.sample_mask_points(masks, 100))
    assert torch.equal(after_ours, torch.rand(3))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 512, 100_003])
def test_randperm_prefix_is_torch_randperm(n):
    for length in sorted({1, min(n, 5), min(n, 512)}):
        ours_gen, torch_gen = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        assert torch.equal(mask_points_cpu.randperm_prefix(n, length, ours_gen),
                           torch.randperm(n, generator=torch_gen)[:length])
        assert torch.equal(ours_gen.get_state(), torch_gen.get_state())
    with pytest.raises(ValueError, match="length"):
        mask_points_cpu.randperm_prefix(3, 4, None)


def test_pixels_at_ranks_is_nonzero_indexed():
    mask = torch.rand(37, 23, generator=torch.Generator().manual_seed(0)) < 0.3
    pixels = mask.nonzero()
    ranks = torch.tensor([0, 5, len(pixels) - 1, 17, 17])
    assert torch.equal(mask_points_cpu.pixels_at_ranks(mask, mask_points_cpu.row_counts(mask), ranks), pixels[ranks])


@pytest.mark.parametrize("listed", [0, 1 << 20])
def test_empty_mask_is_named_like_the_reference(listed, monkeypatch):
    monkeypatch.setattr(mask_points_cpu, "LISTED_MASK_PIXELS", listed)
    masks = [torch.ones(3, 3, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"region 1: mask of shape \(4, 2\) is empty"):
        mask_points_cpu.sample_mask_points(masks, 8)
    with pytest.raises(ValueError, match=r"region 1: mask of shape \(4, 2\) is empty"):
        mask_points_cpu.mask_average_pool(torch.randn(1, 4, 3), masks, torch.zeros(2, dtype=torch.long), 2)


def test_ops_route_cpu_masks_here(monkeypatch):
    calls = []
    monkeypatch.setattr(mask_points_cpu, "sample_mask_points", lambda *a: calls.append("cpu") or torch.zeros(1))
    ops.sample_mask_points([torch.ones(2, 2, dtype=torch.bool)], 4, backend="fast")
    ops.sample_mask_points([torch.ones(2, 2, dtype=torch.bool)], 4)
    assert calls == ["cpu", "cpu"]


def test_a_full_4_mp_mask_costs_a_few_megabytes_not_100():
    """Peak RSS in a fresh process: the reference lists 24 bytes per pixel (~96 MB here)."""
    script = textwrap.dedent("""
        import resource, torch
        from ferret_kernels import mask_points_cpu
        torch.set_num_threads(1)
        mask_points_cpu.sample_mask_points([torch.ones(30, 30, dtype=torch.bool)], 512)  # warm-up
        mask = torch.ones(2000, 2000, dtype=torch.bool)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        points = mask_points_cpu.sample_mask_points([mask], 512, torch.Generator().manual_seed(0))
        assert points.shape == (1, 512, 2)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rise_mb = float(done.stdout.strip().splitlines()[-1])
    assert rise_mb < 40, f"peak RSS rose by {rise_mb:.1f} MB"
