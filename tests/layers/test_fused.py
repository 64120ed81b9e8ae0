"""LipSwish's hand-written first and second derivatives (resflows/layers/activations.py) against autograd through
the plain formula, in float64, up to third order and through a power-series-like double backward."""
import torch
import torch.nn.functional as F

from resflows.layers import LipSwish
from resflows.layers.activations import lipswish

D64 = torch.float64


def _plain(x, beta):
    return x * torch.sigmoid(x * F.softplus(beta)) / 1.1


def _inputs(beta=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(6, 4, generator=g, dtype=D64)).requires_grad_(True)
    return x, torch.tensor([beta], dtype=D64, requires_grad=True)


def test_gradcheck_and_gradgradcheck():
    for beta in (-2.0, 0.3, 4.0):
        x, b = _inputs(beta)
        assert torch.autograd.gradcheck(lipswish, (x, b))
        assert torch.autograd.gradgradcheck(lipswish, (x, b))


def test_third_order_matches_plain_formula():
    x, b = _inputs()
    v = torch.randn(6, 4, dtype=D64, generator=torch.Generator().manual_seed(1))

    def third(f):
        (g,) = torch.autograd.grad((f(x, b) * v).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), x, create_graph=True)
        return torch.autograd.grad((h * v).sum(), [x, b])

    for a, r in zip(third(lipswish), third(_plain)):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)


def test_series_of_vjps_then_backward_matches_plain_formula():
    # The shape of the toy's naive log-det gradient: products w^T J with create_graph, then one backward.
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(4, 8).double(), torch.nn.Linear(8, 4).double()
    x, b = _inputs()

    def grads(f):
        x_ = x.detach().requires_grad_(True)
        g = lin2(f(lin1(x_), b))
        w, total = torch.ones_like(g), 0
        for k in range(1, 4):
            (w,) = torch.autograd.grad(g, x_, w, create_graph=True)
            total = total + (-1) ** (k + 1) / k * w.sum()
        return torch.autograd.grad(total + g.square().sum(), [x_, b, lin1.weight, lin2.weight])

    for a, r in zip(grads(lipswish), grads(_plain)):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)


def test_module_uses_it_and_no_graph_path_is_the_formula():
    act = LipSwish().double()
    x, _ = _inputs()
    with torch.no_grad():
        assert torch.allclose(act(x), _plain(x, act.beta))
    y = act(x)
    assert type(y.grad_fn).__name__.startswith("_LipSwishValue")
    assert torch.allclose(y, _plain(x, act.beta))
