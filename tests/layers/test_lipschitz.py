"""Lipschitz-normalised layers: operator norms against explicit matrices (SVD, brute force)."""
import math

import pytest
import torch
import torch.nn.functional as F

from resflows.layers import InducedNormConv2d, InducedNormLinear, LopConv2d, LopLinear, get_conv2d, get_linear, update_lipschitz
from resflows.layers.norms import asym_squash

D64 = torch.float64
INF = float("inf")


def conv_matrix(weight, in_shape, padding):
    """The explicit matrix of a (bias-free) convolution on an in_shape = (C, H, W) feature map."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=weight.dtype).view(n, *in_shape)
    return F.conv2d(basis, weight, None, 1, padding).reshape(n, -1).t()


def induced_norm_bruteforce(a, p, q):
    """Closed forms for 1->q and p->inf, from the explicit matrix."""
    if p == 1:
        return torch.linalg.vector_norm(a, ord=q, dim=0).max().item()
    if q == INF:
        pd = INF if p == 1 else (1.0 if p == INF else p / (p - 1))
        return torch.linalg.vector_norm(a, ord=pd, dim=1).max().item()
    raise ValueError


def _scaled(layer, factor):
    with torch.no_grad():
        layer.weight.mul_(factor)
    return layer


@pytest.mark.parametrize("k,spatial", [(3, (4, 4)), (3, (3, 5)), (1, (4, 4)), (5, (5, 5))])
def test_conv_spectral_norm_whole_operator(k, spatial):
    torch.manual_seed(k)
    coeff = 0.9
    layer = _scaled(InducedNormConv2d(2, 3, k, 1, k // 2, coeff=coeff, spatial_dims=spatial), 4.0).double()
    update_lipschitz([layer], atol=1e-9, rtol=1e-9, max_iterations=5000)
    raw = torch.linalg.svdvals(conv_matrix(layer.weight, (2, *spatial), k // 2))[0].item()
    normalized = torch.linalg.svdvals(conv_matrix(layer.normalized_weight().detach(), (2, *spatial), k // 2))[0].item()
    assert raw > coeff  # the normalisation is active, so the test can fail
    assert normalized <= coeff * (1 + 1e-3)
    assert abs(float(layer.scale) - raw) <= 1e-3 * raw  # reported scale: sigma of the raw operator
    assert abs(layer.lipschitz_constant() - normalized) <= 1e-3  # reported Lipschitz bound of the layer


def test_conv_buffers_exist_after_init():
    layer = InducedNormConv2d(2, 8, 3, 1, 1, spatial_dims=(6, 5))
    assert layer.u.shape == (8 * 30,) and layer.v.shape == (2 * 30,)
    assert layer.spatial_dims.tolist() == [6.0, 5.0] and int(layer.initialized) == 1
    one = InducedNormConv2d(4, 8, 1, 1, 0, spatial_dims=(6, 5))
    assert one.u.shape == (8,) and one.v.shape == (4,)
    with pytest.raises(ValueError, match="spatial_dims"):
        InducedNormConv2d(2, 8, 3, 1, 1)
    with pytest.raises(ValueError, match="built for 6x5"):
        layer(torch.zeros(1, 2, 4, 4))


def test_linear_spectral_norm():
    torch.manual_seed(0)
    layer = _scaled(InducedNormLinear(6, 5, coeff=0.98), 3.0).double()
    update_lipschitz([layer], atol=1e-10, rtol=1e-10, max_iterations=5000)
    raw = torch.linalg.matrix_norm(layer.weight.detach(), 2).item()
    assert abs(float(layer.scale) - raw) <= 1e-6 * raw
    assert torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2).item() <= 0.98 * (1 + 1e-6)


def test_weight_is_not_rescaled_below_coeff():
    layer = InducedNormLinear(4, 4, coeff=0.98).double()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4, dtype=D64) * 0.5)
    update_lipschitz([layer], atol=1e-10, rtol=1e-10)
    assert torch.allclose(layer.normalized_weight(), layer.weight)


def test_gradient_flows_through_sigma():
    torch.manual_seed(0)
    layer = _scaled(InducedNormLinear(3, 3, coeff=0.5), 5.0).double()
    update_lipschitz([layer], atol=1e-10, rtol=1e-10)
    w = layer.weight
    u, v = layer.u, layer.v
    (g,) = torch.autograd.grad(layer.normalized_weight()[0, 0], w)
    # d/dW [W_00 * coeff / (u^T W v)] = coeff/sigma e_00 - W_00 coeff / sigma^2 u v^T
    sigma = torch.dot(u, w @ v)
    expected = -w[0, 0] * 0.5 / sigma**2 * torch.outer(u, v)
    expected[0, 0] += 0.5 / sigma
    assert torch.allclose(g, expected.detach(), atol=1e-12)


@pytest.mark.parametrize("p,q", [(1, 1), (1, 2), (1, INF), (2, INF), (INF, INF), (3, INF), (1, 3)])
def test_closed_form_norms_match_bruteforce(p, q):
    torch.manual_seed(1)
    conv = get_conv2d(2, 3, 3, 1, 1, coeff=0.9, domain=p, codomain=q, spatial_dims=(4, 4)).double()
    lin = get_linear(5, 4, coeff=0.9, domain=p, codomain=q).double()
    assert isinstance(conv, LopConv2d) and isinstance(lin, LopLinear)
    a_conv = conv_matrix(conv.weight.detach(), (2, 4, 4), 1)
    assert conv.sigma().item() == pytest.approx(induced_norm_bruteforce(a_conv, p, q), rel=1e-12)
    assert lin.sigma().item() == pytest.approx(induced_norm_bruteforce(lin.weight.detach(), p, q), rel=1e-12)
    # A random search never beats the closed form (it is the maximum).
    v = torch.randn(20000, 5, dtype=D64)
    ratios = torch.linalg.vector_norm(v @ lin.weight.detach().t(), ord=q, dim=1) / torch.linalg.vector_norm(v, ord=p, dim=1)
    assert ratios.max().item() <= lin.sigma().item() * (1 + 1e-12)


@pytest.mark.parametrize("p,q", [(1, 2), (2, INF), (INF, INF)])
def test_closed_form_layers_rescale_each_column_or_row(p, q):
    torch.manual_seed(3)
    lin = get_linear(6, 5, coeff=0.9, domain=p, codomain=q).double()
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 6.0, 6, dtype=D64))  # some columns above coeff, some below
        lin.weight.mul_(torch.linspace(0.2, 6.0, 5, dtype=D64).view(5, 1))
    w = lin.normalized_weight().detach()
    assert induced_norm_bruteforce(w, p, q) <= 0.9 * (1 + 1e-12)
    dim = 0 if p == 1 else 1  # the norm of a column (p = 1) runs over rows
    pd = q if p == 1 else (1.0 if p == INF else p / (p - 1))
    before = torch.linalg.vector_norm(lin.weight.detach(), ord=pd, dim=dim)
    after = torch.linalg.vector_norm(w, ord=pd, dim=dim)
    small = before <= 0.9
    assert torch.allclose(after[small], before[small]) and torch.allclose(after[~small], torch.full_like(after[~small], 0.9))


@pytest.mark.parametrize("p,q", [(3, 3), (2, 3), (3, 2)])
def test_generalised_power_method_on_small_matrix(p, q):
    torch.manual_seed(2)
    lin = InducedNormLinear(2, 2, coeff=0.9, domain=p, codomain=q).double()
    update_lipschitz([lin], atol=1e-12, rtol=1e-12, max_iterations=2000)
    a = lin.weight.detach()
    theta = torch.linspace(0, 2 * math.pi, 200001, dtype=D64)
    v = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    best = (torch.linalg.vector_norm(v @ a.t(), ord=q, dim=1) / torch.linalg.vector_norm(v, ord=p, dim=1)).max().item()
    assert float(lin.scale) <= best * (1 + 1e-9)  # u^T A v is a lower bound...
    assert float(lin.scale) >= best * (1 - 1e-4)  # ...that reaches the maximum


def test_power_iteration_tolerance_and_fixed_count():
    torch.manual_seed(0)
    layer = InducedNormConv2d(3, 6, 3, 1, 1, spatial_dims=(5, 5)).double()
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn_like(layer.weight))
    assert update_lipschitz([layer], n_iterations=7) == 7
    loose = update_lipschitz([layer], atol=1e-2, rtol=0)
    tight = update_lipschitz([layer], atol=1e-12, rtol=1e-12, max_iterations=3000)
    assert loose <= tight
    # rtol alone is honoured (the paper replaced it by atol).
    assert update_lipschitz([layer], atol=None, rtol=1e-12, max_iterations=3) == 3
    with pytest.raises(ValueError, match="tolerance"):
        update_lipschitz([layer])


def test_learnable_orders_get_gradients_from_their_objective_and_start_at_two():
    d = torch.nn.Parameter(torch.tensor(0.0))
    c = torch.nn.Parameter(torch.tensor(0.0))
    layer = InducedNormConv2d(2, 4, 3, 1, 1, domain=d, codomain=c, spatial_dims=(4, 4))
    assert layer.norm_orders() == (pytest.approx(2.0), pytest.approx(2.0))
    assert list(dict(layer.named_parameters()))[:2] == ["domain", "codomain"]
    with torch.no_grad():
        layer.weight.mul_(5)
    layer(torch.randn(2, 2, 4, 4)).pow(2).sum().backward()
    assert d.grad is None and c.grad is None  # the forward uses the stored u, v (paper)
    layer.one_step_sigma().backward()  # the orders' own objective
    assert d.grad is not None and c.grad is not None and d.grad.abs() > 0
    x = torch.linspace(-8, 8, 1001, dtype=D64)
    p = asym_squash(x)
    assert p.min() > 1 and p.max() < 5 and torch.all(p[1:] > p[:-1])
