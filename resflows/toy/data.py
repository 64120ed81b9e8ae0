"""2-D toy densities (the standard set of FFJORD's ``toy_data.inf_train_gen``), written with numpy only.

Every sampler takes a ``numpy.random.Generator`` and returns exactly ``n`` points as a float32
``[n, 2]`` array, so a run is reproducible from its seed and every batch is a fresh draw.
The definitions follow the reference (scales, noise levels, class counts); scikit-learn's
``make_swiss_roll`` / ``make_circles`` / ``make_moons`` are re-implemented by their formulas.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import numpy as np
import torch

__all__ = ["DATASETS", "sample", "sample_tensor", "data_rng"]

Sampler = Callable[[int, np.random.Generator], np.ndarray]

# Independent random streams derived from --seed, so that the test set and the figures do not
# depend on how many training batches were drawn before them.
_STREAMS = {"train": 0, "test": 1, "viz": 2}


def data_rng(seed: int, stream: str) -> np.random.Generator:
    """The numpy generator of one stream ('train', 'test' or 'viz') of a run seeded with ``seed``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _STREAMS[stream]])


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    # sklearn.datasets.make_swiss_roll(n, noise=1.0), coordinates (x, z), divided by 5.
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))
    return x / 5


def _8gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    # Eight N(c, 0.5^2 I) on a circle of radius 4, the whole thing divided by 1.414.
    s = 1 / math.sqrt(2)
    centers = 4.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    idx = rng.integers(8, size=n)
    x = rng.standard_normal((n, 2)) * 0.5 + centers[idx]
    return x / 1.414


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = np.arange(n) % num_classes  # equal class sizes (the reference draws n // 5 per class)
    angles = rads[labels] + rate * np.exp(features[:, 0])
    rotations = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], 1).reshape(-1, 2, 2)
    return 2 * rng.permutation(np.einsum("ti,tij->tj", features, rotations))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    # sklearn.datasets.make_circles(n, factor=0.5, noise=0.08), times 3.
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    a_in = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    x = np.concatenate([np.stack([np.cos(a_out), np.sin(a_out)], 1), 0.5 * np.stack([np.cos(a_in), np.sin(a_in)], 1)])
    x = rng.permutation(x) + rng.normal(scale=0.08, size=(n, 2))
    return 3 * x


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    # sklearn.datasets.make_moons(n, noise=0.1), then 2 x + (-1, -0.2).
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0, np.pi, n_out)
    a_in = np.linspace(0, np.pi, n_in)
    x = np.concatenate([np.stack([np.cos(a_out), np.sin(a_out)], 1),
                        np.stack([1 - np.cos(a_in), 1 - np.sin(a_in) - 0.5], 1)])
    x = rng.permutation(x) + rng.normal(scale=0.1, size=(n, 2))
    return 2 * x + np.array([-1.0, -0.2])


def _2spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    m = n - n // 2
    t = np.sqrt(rng.random((m, 1))) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(t) * t + rng.random((m, 1)) * 0.5
    d1y = np.sin(t) * t + rng.random((m, 1)) * 0.5
    x = np.vstack([np.hstack([d1x, d1y]), np.hstack([-d1x, -d1y])])[:n] / 3  # the second spiral mirrors the first
    x = x + rng.standard_normal(x.shape) * 0.1
    return rng.permutation(x)


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2_ = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2_ + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 2


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    # Four concentric rings (radii 3, 2.25, 1.5, 0.75) at evenly spaced angles, plus N(0, 0.08^2) noise.
    sizes = [n // 4] * 3
    sizes = [n - sum(sizes)] + sizes  # the innermost ring takes the remainder, as the reference
    pts = []
    for size, radius in zip(sizes, (0.25, 0.5, 0.75, 1.0)):
        a = np.linspace(0, 2 * np.pi, size, endpoint=False)
        pts.append(radius * np.stack([np.cos(a), np.sin(a)], 1))
    x = rng.permutation(np.concatenate(pts) * 3.0)
    return x + rng.normal(scale=0.08, size=x.shape)


_SAMPLERS: Dict[str, Sampler] = {
    "swissroll": _swissroll,
    "8gaussians": _8gaussians,
    "pinwheel": _pinwheel,
    "circles": _circles,
    "moons": _moons,
    "2spirals": _2spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
}

DATASETS = tuple(_SAMPLERS)


def sample(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` fresh points of toy density ``name`` as a float32 ``[n, 2]`` array."""
    try:
        fn = _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown toy dataset {name!r}; choose from {', '.join(DATASETS)}") from None
    x = fn(int(n), rng)
    assert x.shape == (n, 2), (name, x.shape)
    return x.astype(np.float32)


def sample_tensor(name: str, n: int, rng: np.random.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """:func:`sample` as a torch tensor on ``device``."""
    return torch.from_numpy(sample(name, n, rng)).to(device=device, dtype=dtype)
