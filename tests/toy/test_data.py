"""Toy samplers: exact sizes, reproducible streams, fresh batches, the reference scales."""
import numpy as np
import pytest

from resflows.toy.data import DATASETS, data_rng, sample


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("n", [1, 7, 500])
def test_exact_size_dtype_and_range(name, n):
    x = sample(name, n, data_rng(0, "train"))
    assert x.shape == (n, 2) and x.dtype == np.float32
    assert np.isfinite(x).all() and np.abs(x).max() < 8


@pytest.mark.parametrize("name", DATASETS)
def test_streams_are_reproducible_and_batches_fresh(name):
    a, b = data_rng(3, "train"), data_rng(3, "train")
    first = sample(name, 100, a)
    np.testing.assert_array_equal(first, sample(name, 100, b))
    assert not np.array_equal(first, sample(name, 100, a))  # the next batch is a new draw
    assert not np.array_equal(first, sample(name, 100, data_rng(3, "test")))
    assert not np.array_equal(first, sample(name, 100, data_rng(4, "train")))


def test_reference_scales():
    rng = data_rng(0, "train")
    g = sample("8gaussians", 20000, rng).astype(np.float64)
    r = np.linalg.norm(g, axis=1)
    assert abs(np.median(r) - 4 / 1.414) < 0.05  # centres at radius 4 / 1.414
    rings = sample("rings", 20000, rng)
    radii = np.linalg.norm(rings, axis=1)
    for ring in (0.75, 1.5, 2.25, 3.0):
        assert (np.abs(radii - ring) < 0.3).mean() > 0.2
    board = sample("checkerboard", 20000, rng)
    assert board.min() >= -4 and board.max() <= 4
    # Checkerboard: the occupied 2x2 squares are those where floor(x/2) + floor(y/2) is even.
    cells = (np.floor(board[:, 0] / 2) + np.floor(board[:, 1] / 2)) % 2
    assert (cells == 0).all()


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown toy dataset"):
        sample("spiral", 3, data_rng(0, "train"))
