"""iResBlock: every estimator against exact log-determinants and exact gradients (float64)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from resflows.exact import jacobian_logdet
from resflows.layers import (
    InducedNormConv2d,
    InducedNormLinear,
    InverseNotConvergedWarning,
    LipSwish,
    iResBlock,
    lipschitz_layers,
    update_lipschitz,
)
from resflows.layers.iresblock import geometric_tail, poisson_tail, roulette_weights
from tests.flowcheck import check_flow_layer, check_gradients_unbiased, estimate_and_exact

D64 = torch.float64
SHAPES = {"conv": (2, 3, 3), "fc": (4,)}


def strong_net(kind: str, coeff: float = 0.78, act: nn.Module = None) -> nn.Sequential:
    """A residual branch whose Jacobian has eigenvalues around 0.3-0.55 (so truncation bias is visible
    while the geometric roulette keeps a finite variance)."""
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        l1 = InducedNormConv2d(2, 6, 3, 1, 1, coeff=coeff, spatial_dims=(3, 3))
        l2 = InducedNormConv2d(6, 2, 3, 1, 1, coeff=coeff, spatial_dims=(3, 3))
        with torch.no_grad():
            l1.weight.copy_(0.05 * torch.randn(l1.weight.shape, generator=g))
            l1.weight[:2, :, 1, 1] += torch.eye(2)
            l2.weight.copy_(0.05 * torch.randn(l2.weight.shape, generator=g))
            l2.weight[:, :2, 1, 1] += torch.eye(2)
    else:
        l1, l2 = InducedNormLinear(4, 8, coeff=coeff), InducedNormLinear(8, 4, coeff=coeff)
        with torch.no_grad():
            l1.weight.copy_(0.1 * torch.randn(l1.weight.shape, generator=g))
            l1.weight[:4] += torch.eye(4)
            l2.weight.copy_(0.1 * torch.randn(l2.weight.shape, generator=g))
            l2.weight[:, :4] += torch.eye(4)
    with torch.no_grad():
        l1.bias.fill_(1.0)
        l2.bias.zero_()
    net = nn.Sequential(l1, act if act is not None else nn.ELU(), l2).double()
    update_lipschitz(lipschitz_layers(net), atol=1e-12, rtol=1e-12, max_iterations=5000)
    return net


def point(kind: str) -> torch.Tensor:
    return torch.randn(1, *SHAPES[kind], generator=torch.Generator().manual_seed(5), dtype=D64) * 0.5


# -- roulette --------------------------------------------------------------------------------------
def test_tail_probabilities_match_the_pmfs():
    lamb, p = 2.0, 0.5
    pois = [math.exp(-lamb) * lamb**n / math.factorial(n) for n in range(60)]
    geom = [0.0] + [(1 - p) ** (n - 1) * p for n in range(1, 60)]
    for m in range(12):
        assert poisson_tail(lamb, m) == pytest.approx(sum(pois[m:]), abs=1e-12)
        assert geometric_tail(p, m) == pytest.approx(sum(geom[m:]), abs=1e-12)


def test_roulette_weights():
    tail = lambda m: poisson_tail(2.0, m)  # noqa: E731
    w = roulette_weights([3, 1], n_exact=2, tail=tail)
    assert len(w) == 5
    assert w[:2] == [1.0, 1.0]
    assert w[2] == pytest.approx(1.0 / tail(1))  # both draws >= 1
    assert w[3] == pytest.approx(0.5 / tail(2))  # one of two draws >= 2
    assert w[4] == pytest.approx(0.5 / tail(3))


def test_draws_come_from_a_seedable_torch_generator():
    block = iResBlock(strong_net("fc"), n_dist="poisson", n_samples=5)
    block.generator = torch.Generator().manual_seed(3)
    first = block._draw()
    block.generator = torch.Generator().manual_seed(3)
    assert block._draw() == first
    block.generator = None
    torch.manual_seed(11)
    a = block._draw()
    torch.manual_seed(11)
    assert block._draw() == a


# -- exact modes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("mode", ["brute_force", "exact_trace_train", "exact_trace_eval"])
def test_exact_modes_match_slogdet(kind, mode):
    kw = {"brute_force": True} if mode == "brute_force" else {"exact_trace": True, "n_power_series": 80}
    block = iResBlock(strong_net(kind), **kw)
    block.train(mode != "exact_trace_eval")
    block.inverse_atol, block.inverse_rtol = 1e-22, 0.0  # the stopping rule compares squared steps
    x = torch.cat([point(kind), 0.3 * point(kind).flip(-1)])
    check_flow_layer(block, x, rtol=1e-6, inv_atol=1e-9)


def test_two_dimensional_inputs_use_the_exact_determinant_in_evaluation():
    torch.manual_seed(0)
    net = nn.Sequential(InducedNormLinear(2, 16, coeff=0.9), LipSwish(), InducedNormLinear(16, 2, coeff=0.9)).double()
    with torch.no_grad():
        for m in lipschitz_layers(net):
            m.weight.mul_(5)
    update_lipschitz(lipschitz_layers(net), atol=1e-12, rtol=1e-12, max_iterations=5000)
    block = iResBlock(net).eval()
    x = torch.randn(7, 2, dtype=D64) * 2
    _, ld = block(x)
    _, exact = jacobian_logdet(lambda t: block(t)[0], x)
    assert torch.allclose(ld, exact, rtol=1e-10)
    _, ld2 = block(x)
    assert torch.equal(ld, ld2)  # deterministic: no probe, no roulette


# -- unbiasedness ------------------------------------------------------------------------------------
CASES = [(k, d, ne, ns, tr) for k in ("conv", "fc") for d in ("poisson", "geometric")
         for ne in (0, 2) for ns in (1, 3) for tr in (True, False)]


@pytest.mark.parametrize("kind,dist,n_exact,n_samples,training", CASES)
def test_estimator_is_unbiased(kind, dist, n_exact, n_samples, training):
    x = point(kind)
    block = iResBlock(strong_net(kind), n_dist=dist, n_exact_terms=n_exact, n_samples=n_samples).train(training)
    mean, se, exact = estimate_and_exact(block, x)
    assert abs(mean - exact) < 3 * se, (mean, exact, se)


@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_truncated_series_fails_the_unbiasedness_check(kind):
    """Proof that the test above can fail: a 2-term truncation is biased by many standard errors."""
    x = point(kind)
    block = iResBlock(strong_net(kind), n_power_series=2).train()
    mean, se, exact = estimate_and_exact(block, x)
    assert abs(mean - exact) > 5 * se


# -- gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("neumann,mem_eff", [(True, True), (True, False), (False, False), (False, True)])
def test_gradient_estimators_are_unbiased(kind, neumann, mem_eff):
    x = point(kind)
    block = iResBlock(strong_net(kind, act=LipSwish()), neumann_grad=neumann, grad_in_forward=mem_eff).train()
    check_gradients_unbiased(block, x, draws=80)


@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("neumann", [True, False])
def test_memory_efficient_gradients_equal_the_plain_path(kind, neumann):
    """Same random draws, a loss that weights samples unequally: identical gradients (paper bug 1)."""
    x0 = torch.randn(5, *SHAPES[kind], generator=torch.Generator().manual_seed(1), dtype=D64) * 0.5
    a = torch.tensor([0.1, -2.0, 3.0, 0.7, 1.5], dtype=D64)
    c = torch.randn(5, *SHAPES[kind], generator=torch.Generator().manual_seed(2), dtype=D64)
    results = []
    for mem_eff in (False, True):
        block = iResBlock(strong_net(kind, act=LipSwish()), neumann_grad=neumann, grad_in_forward=mem_eff).train()
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(21)
        y, ld = block(x)
        loss = (a * ld).sum() + (c * y).sum()
        params = [p for p in block.nnet.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [x] + params)
        results.append((ld.detach(), grads))
    (ld0, g0), (ld1, g1) = results
    assert torch.allclose(ld0, ld1, rtol=1e-10, atol=1e-12)
    for u, v in zip(g0, g1):
        assert torch.allclose(u, v, rtol=1e-6, atol=1e-10), (u - v).abs().max()


def test_neumann_mode_reports_the_log_det_estimate_not_a_surrogate():
    x = point("fc").expand(16, 4)
    values = []
    for neumann in (True, False):
        block = iResBlock(strong_net("fc"), neumann_grad=neumann).train()
        torch.manual_seed(4)
        values.append(block(x)[1].detach())
    assert torch.allclose(values[0], values[1], rtol=1e-12)


def test_every_branch_parameter_gets_a_gradient_but_the_truncation_parameters():
    block = iResBlock(strong_net("conv", act=LipSwish())).train()
    x = point("conv").expand(4, 2, 3, 3).clone().requires_grad_(True)
    y, ld = block(x)
    (y.sum() + ld.sum()).backward()
    for name, p in block.named_parameters():
        if name in ("geom_p", "lamb"):
            assert not p.requires_grad and p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_runs_in_float32_and_float64(dtype):
    block = iResBlock(strong_net("conv", act=LipSwish())).to(dtype).train()
    x = point("conv").to(dtype).expand(3, 2, 3, 3)
    y, ld = block(x)
    assert y.dtype == dtype and ld.dtype == dtype
    ld.sum().backward()
    block.eval()
    with torch.no_grad():
        y, ld = block(x)
    assert ld.dtype == dtype and torch.isfinite(ld).all()


def test_estimator_moments_are_recorded():
    block = iResBlock(strong_net("fc"), n_samples=3).train()
    with torch.no_grad():
        _, ld = block(point("fc").expand(32, 4))
    assert float(block.last_firmom) == pytest.approx(ld.mean().item())
    assert float(block.last_secmom) == pytest.approx((ld**2).mean().item())
    assert block.last_n_samples.shape == (3,)


# -- inverse ---------------------------------------------------------------------------------------
def test_fixed_point_inverse_and_non_convergence_warning():
    block = iResBlock(strong_net("conv")).eval()
    x = point("conv").expand(3, 2, 3, 3) * torch.tensor([1.0, -1.0, 2.0], dtype=D64).view(3, 1, 1, 1)
    y = block.transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # The paper's rule stops once every squared step is below 1e-5 (1 + |y|): steps of ~3e-3.
        assert torch.allclose(block.invert(y), x, atol=5e-3)
        block.inverse_atol, block.inverse_rtol = 1e-24, 0.0
        assert torch.allclose(block.invert(y), x, atol=1e-10)
    block.inverse_max_iters = 2
    with pytest.warns(InverseNotConvergedWarning, match="did not converge in 2 iterations"):
        block.invert(y)
