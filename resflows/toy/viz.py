"""Densities on a grid, samples through the inverse, and the three-panel toy figure.

Everything that pushes many points through the model works in chunks of ``chunk_size`` points, so the
peak memory of a figure is set by the chunk size, not by the grid: each residual block frees its
Jacobian graph before the next block runs (evaluation needs no graph), so one chunk costs roughly
``chunk_size x (hidden widths)`` floats per layer of one block. (The paper's code evaluated 10,000
points at a time and kept the graphs of all blocks alive: about 6.8 GB for the default 100 blocks.)
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from ..losses import standard_normal_logprob

__all__ = [
    "LOW", "HIGH", "DEFAULT_CHUNK", "FIGSIZE", "DPI", "FIGURE_PIXELS",
    "eval_mode", "log_density", "grid_points", "grid_log_density", "sample_model", "histogram", "save_figure",
]

LOW, HIGH = -4.0, 4.0
DEFAULT_CHUNK = 4096
# Fixed figure geometry, so every PNG is exactly FIGURE_PIXELS (width, height) = (900, 300) pixels.
FIGSIZE = (9.0, 3.0)
DPI = 100
FIGURE_PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode (exact 2x2 log-dets, frozen moving averages) for the duration of the block."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def log_density(model: nn.Module, x: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` per point, ``chunk_size`` points at a time.
    In evaluation mode residual blocks use the exact 2x2 determinant."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out = []
    for xc in torch.split(x, chunk_size):
        z, logdet = model(xc)
        out.append(standard_normal_logprob(z).sum(1) + logdet)
    return torch.cat(out) if out else x.new_zeros(0)


def grid_points(npts: int, low: float = LOW, high: float = HIGH, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``npts x npts`` grid over ``[low, high]^2`` as ``[npts^2, 2]`` points, row-major in y (row i is
    ``y = side[i]``), so ``values.reshape(npts, npts)`` is an image with y along the rows."""
    side = torch.linspace(low, high, npts, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


@torch.no_grad()
def grid_log_density(model: nn.Module, npts: int, chunk_size: int = DEFAULT_CHUNK, low: float = LOW,
                     high: float = HIGH, device=None, dtype=torch.float32) -> torch.Tensor:
    """``log p`` on the ``npts x npts`` grid as an ``[npts, npts]`` tensor (rows: y, columns: x)."""
    x = grid_points(npts, low, high, device, dtype)
    return log_density(model, x, chunk_size).reshape(npts, npts)


@torch.no_grad()
def sample_model(model: nn.Module, n: int, chunk_size: int = DEFAULT_CHUNK, generator: Optional[torch.Generator] = None,
                 device=None, dtype=torch.float32) -> torch.Tensor:
    """``x = f^{-1}(z)``, ``z ~ N(0, I)``: ``n`` model samples through the inverse, in chunks. ``z`` is drawn on
    the CPU from ``generator`` so that the samples do not depend on the device."""
    z = torch.randn(n, 2, generator=generator, dtype=dtype)
    out = [model.invert(zc.to(device)) for zc in torch.split(z, chunk_size)]
    return torch.cat(out) if out else z.to(device)


def histogram(points: np.ndarray, npts: int, low: float = LOW, high: float = HIGH) -> np.ndarray:
    """2-D histogram of ``[n, 2]`` points with ``npts`` bins per side, as an image (rows: y, columns: x)."""
    h, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=npts, range=[[low, high], [low, high]])
    return h.T


def save_figure(path: str, data: np.ndarray, log_px: np.ndarray, samples: np.ndarray, npts: int,
                title: Optional[str] = None) -> str:
    """Write the three-panel PNG (data histogram | model density | histogram of model samples), exactly
    ``FIGURE_PIXELS`` pixels. Uses matplotlib's object API (no pyplot state, no display needed)."""
    from matplotlib.figure import Figure

    px = np.exp(np.clip(np.nan_to_num(log_px, nan=-np.inf), -np.inf, 30.0))  # exp(30): far above any plausible peak
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    axes = fig.subplots(1, 3)
    extent = (LOW, HIGH, LOW, HIGH)
    panels = ((histogram(data, npts), r"$x \sim p(x)$"), (px, r"$q(x)$"), (histogram(samples, npts), r"$x \sim q(x)$"))
    for ax, (img, label) in zip(axes, panels):
        # origin='lower': row 0 is y = LOW, so all three panels share the same orientation.
        ax.imshow(img, cmap="inferno", origin="lower", extent=extent, interpolation="nearest", aspect="equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=8, x=0.01, ha="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.05)
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path
