"""Point sampling strategies for point prompts."""

import numpy as np
import pytest

from ferret.data.points import POINT_STRATEGIES, gaussian_in_box, nearest_in_mask, sample_point


def _ring_mask():
    ys, xs = np.mgrid[0:60, 0:80]
    dist = np.hypot(xs - 40, ys - 30)
    return (dist <= 20) & (dist >= 12)  # centre pixel not in the mask


BOX = (20, 10, 60, 50)


@pytest.mark.parametrize("strategy", [s for s in POINT_STRATEGIES if s.startswith("segment_mask")])
def test_segment_strategies_land_on_the_mask(strategy):
    mask = _ring_mask()
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = sample_point(strategy, BOX, mask, rng)
        assert float(x).is_integer() and float(y).is_integer()
        assert mask[int(y), int(x)]


def test_uniform_covers_the_mask_and_center_is_nearest_to_box_center():
    mask = _ring_mask()
    rng = np.random.default_rng(1)
    points = {sample_point("segment_mask|uniform", BOX, mask, rng) for _ in range(300)}
    assert len(points) > 100  # spread over the ring, not one spot
    x, y = sample_point("segment_mask|center", BOX, mask, rng)
    assert np.hypot(x - 40, y - 30) == pytest.approx(12, abs=1.0)  # inner edge of the ring


def test_center_strategy_is_the_box_center():
    assert sample_point("center", (10, 20, 31, 41), None, np.random.default_rng(0)) == (20.5, 30.5)


def test_gaussian_stays_in_box_and_clusters_at_center():
    rng = np.random.default_rng(2)
    pts = np.array([gaussian_in_box(BOX, rng) for _ in range(500)])
    assert (pts[:, 0] >= 20).all() and (pts[:, 0] <= 60).all()
    assert (pts[:, 1] >= 10).all() and (pts[:, 1] <= 50).all()
    assert np.abs(pts.mean(axis=0) - (40, 30)).max() < 1.5
    assert 4 < pts[:, 0].std() < 8  # 0.15 * 40 = 6


def test_segment_strategy_without_mask_falls_back_to_gaussian_in_box():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = sample_point("segment_mask|uniform", BOX, None, rng)
        assert 20 <= x <= 60 and 10 <= y <= 50


def test_seeded_generator_reproduces_points():
    mask = _ring_mask()
    a = [sample_point("segment_mask|gaussian", BOX, mask, np.random.default_rng(7)) for _ in range(3)]
    b = [sample_point("segment_mask|gaussian", BOX, mask, np.random.default_rng(7)) for _ in range(3)]
    assert a == b


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown point sampling strategy"):
        sample_point("random", BOX, None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="empty segment mask"):
        nearest_in_mask(np.zeros((5, 5), bool), (2, 2), np.random.default_rng(0))
