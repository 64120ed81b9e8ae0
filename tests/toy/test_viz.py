"""Grid densities in chunks, sampling through the inverse, and the figure file."""

import numpy as np
import pytest
import torch
from PIL import Image

from resflows.toy import ToyConfig, build_toy_model
from resflows.toy.viz import FIGURE_PIXELS, eval_mode, grid_log_density, grid_points, histogram, log_density, sample_model, save_figure


class Spy(torch.nn.Module):
    """Records the batch size of every call of the wrapped flow."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)

    def invert(self, z):
        self.sizes.append(z.shape[0])
        return self.model.invert(z)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_toy_model(ToyConfig(nblocks=2, dims=(16, 16), actnorm=True)).double()
    m(torch.randn(64, 2, dtype=torch.float64) * 2)  # ActNorm init
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    m.update_lipschitz(n_iterations=50)
    return m.eval()


def test_chunked_grid_equals_unchunked_and_respects_chunk_size(model):
    npts = 23  # 529 points
    full = grid_log_density(model, npts, chunk_size=10**6, dtype=torch.float64)
    spy = Spy(model)
    chunked = grid_log_density(spy, npts, chunk_size=50, dtype=torch.float64)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    assert spy.sizes == [50] * 10 + [29]
    # The density of a flow integrates to about one over a box that holds nearly all of its mass.
    fine = grid_log_density(model, 201, chunk_size=4096, low=-10, high=10, dtype=torch.float64)
    assert abs(fine.exp().sum().item() * (20 / 200) ** 2 - 1) < 0.02


def test_grid_rows_are_y(model):
    pts = grid_points(3, -1, 1)
    assert pts.tolist() == [[-1, -1], [0, -1], [1, -1], [-1, 0], [0, 0], [1, 0], [-1, 1], [0, 1], [1, 1]]
    h = histogram(np.array([[3.9, -3.9]]), 4)  # x high, y low -> bottom row (row 0), last column
    assert h[0, 3] == 1 and h.sum() == 1
    lp = grid_log_density(model, 5, dtype=torch.float64)
    torch.testing.assert_close(lp[1, 3], log_density(model, torch.tensor([[2.0, -2.0]], dtype=torch.float64))[0])


def test_samples_in_chunks(model):
    spy = Spy(model)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = sample_model(spy, 130, chunk_size=64, generator=g1, dtype=torch.float64)
    b = sample_model(model, 130, chunk_size=1000, generator=g2, dtype=torch.float64)
    assert spy.sizes == [64, 64, 2]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_eval_mode_restores(model):
    model.train()
    with eval_mode(model):
        assert not model.training
    assert model.training


def test_figure_size_and_determinism(tmp_path):
    rng = np.random.default_rng(0)
    data, samples = rng.normal(size=(500, 2)), rng.normal(size=(500, 2))
    log_px = np.full((40, 40), -3.0)
    log_px[0, 0] = np.nan  # robust to the odd non-finite value
    p1, p2 = tmp_path / "a.png", tmp_path / "b.png"
    save_figure(str(p1), data, log_px, samples, 40, title="t")
    save_figure(str(p2), data, log_px, samples, 40, title="t")
    with Image.open(p1) as im:
        assert im.format == "PNG" and im.size == FIGURE_PIXELS == (900, 300)
    assert p1.read_bytes() == p2.read_bytes()
