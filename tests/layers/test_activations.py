"""Activations: formulas and Lipschitz constants."""
import pytest
import torch
import torch.nn.functional as F

from resflows.layers import ACTIVATIONS, CLipSwish, FullSort, LipschitzCube, LipSwish, MaxMin, make_activation

D64 = torch.float64


def _max_slope(f, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return g.abs().max().item()


@pytest.mark.parametrize("beta", [-3.0, 0.0, 0.5, 2.0, 10.0])
def test_lipswish_formula_and_lipschitz(beta):
    act = LipSwish().double()
    with torch.no_grad():
        act.beta.fill_(beta)
    x = torch.linspace(-30, 30, 200001, dtype=D64)
    b = F.softplus(torch.tensor(beta, dtype=D64))
    assert torch.allclose(act(x), x * torch.sigmoid(x * b) / 1.1)
    assert _max_slope(act, x) <= 1.0


def test_lipswish_beta_initialised_to_half():
    assert LipSwish().beta.tolist() == [0.5]


@pytest.mark.parametrize("beta", [-3.0, 0.5, 3.0])
def test_clipswish_is_1_lipschitz(beta):
    act = CLipSwish().double()
    with torch.no_grad():
        act.swish.beta.fill_(beta)
    x = torch.linspace(-20, 20, 20001, dtype=D64).view(-1, 1)
    y = act(x)
    assert y.shape == (x.shape[0], 2)
    # Per coordinate the Jacobian is the column [f'(x), -f'(-x)]: its norm is the Lipschitz constant.
    xr = x.clone().requires_grad_(True)
    out = act(xr)
    (d0,) = torch.autograd.grad(out[:, 0].sum(), xr, retain_graph=True)
    (d1,) = torch.autograd.grad(out[:, 1].sum(), xr)
    assert torch.sqrt(d0**2 + d1**2).max().item() <= 1.0


@pytest.mark.parametrize("beta", [-3.0, 0.5, 3.0])
def test_clipswish_formula(beta):
    act = CLipSwish().double()
    with torch.no_grad():
        act.swish.beta.fill_(beta)
    x = torch.randn(5, 3, dtype=D64) * 3
    b = F.softplus(torch.tensor(beta, dtype=D64))
    expected = torch.cat([x * torch.sigmoid(x * b), -x * torch.sigmoid(-x * b)], 1) / 1.1 / 1.004
    torch.testing.assert_close(act(x), expected, rtol=1e-12, atol=1e-12)


def test_lipschitz_cube():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=D64)
    expected = torch.tensor([-2 + 2 / 3, -1 / 3, -0.125 / 3, 0.0, 0.125 / 3, 1 / 3, 3 - 2 / 3], dtype=D64)
    assert torch.allclose(LipschitzCube()(x), expected)
    assert _max_slope(LipschitzCube(), torch.linspace(-3, 3, 10001, dtype=D64)) <= 1.0


def test_sorting_activations_preserve_norms():
    x = torch.randn(5, 6, dtype=D64)
    for act in (FullSort(), MaxMin()):
        y = act(x)
        assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
        assert torch.equal(y.sort(1)[0], x.sort(1)[0])
    assert torch.equal(MaxMin()(torch.tensor([[1.0, 3.0, 4.0, 2.0]])), torch.tensor([[3.0, 4.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="even"):
        MaxMin()(torch.zeros(1, 3))


@pytest.mark.parametrize("name", sorted(set(ACTIVATIONS) - {"selu"}))
def test_registry_activations_are_1_lipschitz(name):
    act = make_activation(name).double()
    x = torch.randn(64, 4, dtype=D64) * 3
    y = act(x)
    assert torch.isfinite(y).all()
    # Empirical Lipschitz ratio on random pairs.
    x2 = x + 1e-3 * torch.randn_like(x)
    ratio = (act(x2) - y).norm(dim=1) / (x2 - x).norm(dim=1)
    assert ratio.max().item() <= 1.0 + 1e-9


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("gelu")
