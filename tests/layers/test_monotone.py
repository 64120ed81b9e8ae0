"""The monotone (Cayley) block against exact math in float64: round trip, strong monotonicity, the log-det
against slogdet of the block's finite-difference Jacobian, the estimator's unbiasedness, and every gradient
mode against autograd through an exact solve; and CPila / CReLU / Pila."""
import math

import pytest
import torch
import torch.nn as nn

from resflows.layers import LipSwish, get_conv2d, get_linear, lipschitz_layers
from resflows.layers.activations import CPILA_SCALE, CPila, CReLU, Pila, make_activation, pila, pila_slope
from resflows.layers.dense import dense_conv_layers
from resflows.layers.jacobian import batch_jacobian
from resflows.layers.monotone import MonotoneBlock, monotone_series, solve_fixed_point

D64 = torch.float64
SQRT2 = math.sqrt(2.0)


def fc_branch(coeff=0.9, act=LipSwish):
    torch.manual_seed(0)
    net = nn.Sequential(get_linear(3, 8, coeff=coeff), act(), get_linear(8 * getattr(act, "out_multiplier", 1), 3, coeff=coeff))
    return _settle(net)


def conv_branch(act="cpila"):
    torch.manual_seed(1)
    net = dense_conv_layers(2, depth=2, growth=4, act=act,
                            make_conv=lambda i, o, k: get_conv2d(i, o, k, 1, k // 2, coeff=0.95, spatial_dims=(3, 3)))
    return _settle(net)


def _settle(net):
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(3.0)  # the normalisation is active: Lip(g) is at its bound
        for m in lipschitz_layers(net):
            m.update_lipschitz(n_iterations=50)
    return net


def exact_block(net, **kw):
    blk = MonotoneBlock(net, inverse_atol=1e-14, inverse_rtol=1e-14, **kw).double()
    blk.adjoint_rtol, blk.adjoint_atol = 1e-14, 1e-300
    return blk


def exact_solve(net, x):
    """The reference: ``w`` solved to round-off without a graph, then one Newton step with its graph,
    ``w + (I + J)^{-1} (sqrt(2) x - w - g(w))``: the value stays ``w`` and its derivatives in ``x`` and the parameters
    are the implicit function's, written with the dense Jacobian (independent of the block's adjoint iteration)."""
    b = x.shape[0]
    with torch.no_grad():
        w = SQRT2 * x
        for _ in range(500):
            w_next = SQRT2 * x - net(w)
            done = bool(((w_next - w).abs() <= 1e-15 * (1 + w.abs())).all())
            w = w_next
            if done:
                break
    w = w.detach().requires_grad_(True)
    jac = batch_jacobian(net(w), w).detach()
    eye = torch.eye(jac.shape[-1], dtype=D64)
    res = (SQRT2 * x - w.detach() - net(w.detach())).reshape(b, -1, 1)
    w_ref = w.detach() + torch.linalg.solve(eye + jac, res).reshape(x.shape)
    return w_ref, SQRT2 * w_ref - x


def fd_jacobian(fn, x, h=1e-5):
    """Central differences of ``fn`` per sample (fn acts on each sample independently)."""
    b, d = x.shape[0], x[0].numel()
    cols = []
    for i in range(d):
        e = torch.zeros(d, dtype=D64)
        e[i] = h
        e = e.reshape(x.shape[1:])
        cols.append(((fn(x + e) - fn(x - e)) / (2 * h)).reshape(b, -1))
    return torch.stack(cols, 2)


CASES = {"fc": (lambda: fc_branch(), (4, 3)), "dense_conv_cpila": (lambda: conv_branch(), (3, 2, 3, 3))}


# -- the map --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["fixed-point", "anderson"])
def test_round_trip_and_equations(case, method):
    build, shape = CASES[case]
    net = build()
    blk = MonotoneBlock(net, inverse_atol=1e-12, inverse_rtol=1e-12).double().eval()
    blk.inverse_method = method
    x = torch.randn(shape, dtype=D64)
    with torch.no_grad():
        y = blk.transform(x)
        w = (y + x) / SQRT2
        assert torch.allclose(w + net(w), SQRT2 * x, atol=1e-10)  # forward equation
        x_back = blk.invert(y)
        assert torch.allclose(x_back, x, atol=1e-10)
        w_inv = (x_back + y) / SQRT2
        assert torch.allclose(w_inv - net(w_inv), SQRT2 * y, atol=1e-10)  # inverse equation
    assert blk.last_solve_iters > 2 and blk.last_inverse_iters > 2


def test_round_trip_in_float32_to_the_solver_tolerance():
    net = fc_branch().float()
    blk = MonotoneBlock(net).eval()
    x = torch.randn(64, 3)
    with torch.no_grad():
        assert torch.allclose(blk.invert(blk.transform(x)), x, atol=1e-4)


def test_strongly_monotone_and_bounded_slopes():
    """<F(a) - F(b), a - b> >= (1 - L^2) |dw|^2 / 2 > 0 on random pairs, and |F(a) - F(b)| <= (1+L)/(1-L) |a - b|."""
    L = 0.9
    net = fc_branch(coeff=L)
    blk = MonotoneBlock(net, inverse_atol=1e-13, inverse_rtol=1e-13).double().eval()
    a, b = torch.randn(500, 3, dtype=D64) * 2, torch.randn(500, 3, dtype=D64) * 2
    b[:100] = a[:100] + 1e-3 * torch.randn(100, 3, dtype=D64)  # close pairs too
    with torch.no_grad():
        fa, fb = blk.transform(a), blk.transform(b)
        dw = (fa + a - fb - b) / SQRT2
    inner = ((fa - fb) * (a - b)).sum(1)
    assert (inner >= 0.5 * (1 - L * L) * (dw * dw).sum(1) * (1 - 1e-9)).all() and (inner > 0).all()
    assert ((fa - fb).norm(dim=1) <= (1 + L) / (1 - L) * (a - b).norm(dim=1) + 1e-12).all()


def test_solver_stops_per_sample():
    """Each sample keeps the value at which it met its own tolerance; a sample needing more iterations does not
    move the others."""
    scales = torch.tensor([0.1, 0.95], dtype=D64)
    G = lambda x: scales[: x.shape[0], None] * x + 1.0  # noqa: E731 - contraction rates 0.1 and 0.95
    x, evals, ok = solve_fixed_point(G, torch.zeros(2, 3, dtype=D64), 1e-10, 0.0, 10000)
    assert ok.all() and evals > 300
    assert torch.allclose(x, (1 / (1 - scales))[:, None].expand(2, 3), atol=1e-8)
    alone, few, _ = solve_fixed_point(G, torch.zeros(1, 3, dtype=D64), 1e-10, 0.0, 10000)  # only the fast sample
    assert few < 20 and torch.equal(alone[0], x[0])  # held where it stopped
    _, capped, ok = solve_fixed_point(G, torch.zeros(2, 3, dtype=D64), 1e-10, 0.0, 50)
    assert capped == 50 and ok.tolist() == [True, False]


# -- the log-det ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["fc", pytest.param("dense_conv_cpila", marks=pytest.mark.slow)])
def test_exact_logdet_equals_slogdet(case):
    build, shape = CASES[case]
    net = build()
    blk = exact_block(net, brute_force=True).eval()
    x = torch.randn(shape, dtype=D64)
    with torch.no_grad():
        y, logdet = blk(x)
        jac = fd_jacobian(blk.transform, x)
        x_back, inv_logdet = blk.inverse(y)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac)[1], atol=1e-7)
    assert torch.allclose(inv_logdet, -logdet, atol=1e-10)


def test_2d_inputs_use_the_exact_logdet_in_evaluation():
    torch.manual_seed(3)
    net = _settle(nn.Sequential(get_linear(2, 16, coeff=0.97), CPila(), get_linear(32, 2, coeff=0.97)))
    blk = exact_block(net).eval()
    x = torch.randn(5, 2, dtype=D64)
    with torch.no_grad():
        assert torch.allclose(blk(x)[1], torch.linalg.slogdet(fd_jacobian(blk.transform, x))[1], atol=1e-7)


def test_exact_trace_series_converges_to_the_logdet():
    net = fc_branch()
    x = torch.randn(4, 3, dtype=D64)
    exact = exact_block(net, brute_force=True).eval()(x)[1]
    series = exact_block(net, exact_trace=True, n_power_series=301).train()
    with torch.no_grad():
        assert torch.allclose(series(x)[1], exact, atol=1e-8)


def _estimates(blk, x, n, copies=20):
    """n independent estimates per sample: each call draws one series length for its batch, so the copies of a
    sample within a call are averaged into one estimate."""
    with torch.no_grad():
        w = blk.solve(x).repeat(copies, 1)
        return torch.stack([blk.logdet_at(w).reshape(copies, -1).mean(0) for _ in range(n)])


def test_estimator_is_unbiased_and_truncation_is_not():
    """Roulette (geometric, p = 0.2, 1 exact term) and Hutchinson probes: the mean of 1000 estimates is within 3 standard
    errors of the exact log-det per sample; a series truncated after the first term is not."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()  # J ~ 0.6 I: the higher terms matter
    with torch.no_grad():
        net[0].weight.copy_(0.6 * torch.eye(3) + 0.05 * torch.randn(3, 3))
        net[0].bias.zero_()
    x = 0.1 * torch.randn(3, 3, dtype=D64)
    exact = exact_block(net, brute_force=True).eval()(x)[1].detach()
    blk = exact_block(net, n_exact_terms=1, n_dist="geometric", geom_p=0.2).train()
    est = _estimates(blk, x, 1000)
    z = (est.mean(0) - exact) / (est.std(0) / math.sqrt(est.shape[0]))
    assert z.abs().max() < 3, z
    truncated = exact_block(net, n_power_series=2).train()
    est = _estimates(truncated, x, 1000)
    z = (est.mean(0) - exact) / (est.std(0) / math.sqrt(est.shape[0]))
    assert z.abs().max() > 3, z


def test_evaluation_series_has_twenty_exact_terms():
    net = fc_branch()
    blk = exact_block(net).eval()
    weights, _ = blk.series_plan()
    assert len(weights) >= 20 and weights[:20] == [1.0] * 20


def test_series_coefficients_and_derivative_vector():
    """monotone_series on an explicit matrix: sum_{k odd} -2/k w_k v^T J^k v and s = -2 sum_{k odd} w_k (J^T)^{k-1} v."""
    torch.manual_seed(0)
    J = 0.3 * torch.randn(2, 4, 4, dtype=D64)
    v = torch.randn(2, 4, dtype=D64)
    weights = [1.0, 1.0, 0.5, 2.0, 0.25, 3.0]  # the last (even) term contributes nothing
    vjp = lambda t: torch.einsum("bi,bij->bj", t, J)  # noqa: E731
    est, s = monotone_series(vjp, v, weights, neumann=True)
    Jk = lambda k: torch.linalg.matrix_power(J, k)  # noqa: E731
    ref = sum(-2.0 / k * weights[k - 1] * torch.einsum("bi,bij,bj->b", v, Jk(k), v) for k in (1, 3, 5))
    ref_s = sum(-2.0 * weights[k - 1] * torch.einsum("bi,bij->bj", v, Jk(k - 1)) for k in (1, 3, 5))
    assert torch.allclose(est, ref) and torch.allclose(s, ref_s)


# -- gradients --------------------------------------------------------------------------------------------------
MODES = {  # (neumann_grad, grad_in_forward, use_linearize)
    "naive": (False, False, True),
    "neumann": (True, False, True),
    "mem_eff": (False, True, True),
    "mem_eff_neumann_linearized": (True, True, True),
    "mem_eff_neumann_autograd": (True, True, False),
}


def _reference_estimate(net, x, v, weights):
    """The series estimate at the exact solve, with its whole graph (autograd through the exact solve)."""
    w, y = exact_solve(net, x)
    est = torch.zeros(x.shape[0], dtype=D64)
    t = v
    for k in range(1, len(weights) + 1):
        (t,) = torch.autograd.grad(net(w), w, t, create_graph=True)
        if k % 2:
            est = est + (-2.0 / k) * weights[k - 1] * (t * v).reshape(x.shape[0], -1).sum(1)
    return y, est


def _reference_neumann(net, x, v, weights):
    """The Neumann route written out with the dense Jacobian: value the series estimate, gradient that of
    ``s^T J(w) v`` with ``s = -2 sum_{k odd} w_k (J^T)^{k-1} v`` held fixed (d tr J^k = k tr(J^{k-1} dJ))."""
    y, est = _reference_estimate(net, x, v, weights)
    w = (y + x) / SQRT2
    b = x.shape[0]
    jac = batch_jacobian(net(w), w, create_graph=True)
    jd = jac.detach()
    vf = v.reshape(b, -1)
    s, t = torch.zeros_like(vf), vf
    for k in range(1, len(weights) + 1):
        if k % 2:
            s = s - 2.0 * weights[k - 1] * t
        t = torch.einsum("bi,bij->bj", t, jd)  # v^T J^k
    sjv = torch.einsum("bi,bij,bj->b", s, jac, vf)
    return y, est.detach() + (sjv - sjv.detach())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_gradients_equal_autograd_through_an_exact_solve(case, mode):
    """Loss sum_i c_i (a . y_i + logdet_i) with unequal sample weights c_i and the same probes and series draws:
    every gradient mode's gradients for x and every parameter equal autograd through the exact solve (of the series
    itself for the naive modes, of the Neumann surrogate for the Neumann modes)."""
    build, shape = CASES[case]
    net = build()
    neumann, mem_eff, lin = MODES[mode]
    blk = exact_block(net, n_exact_terms=2, n_dist="poisson", neumann_grad=neumann, grad_in_forward=mem_eff).train()
    # A drawn N = 4: six terms with roulette weights 1, 1, 1/P(N>=1), ..., 1/P(N>=4), all different, and even powers
    # of J in the Neumann vector, so a misplaced weight or power shows.
    blk._draw = lambda: [4]
    blk.use_linearize = lin
    assert blk.linearizable == lin
    torch.manual_seed(11)
    x = torch.randn(shape, dtype=D64)
    v = torch.randn(shape, dtype=D64)
    a = torch.randn(shape, dtype=D64)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0][: shape[0]], dtype=D64)
    blk.probe_fn = lambda t: v
    weights, _ = blk.series_plan()
    assert len(weights) == 6 and len(set(weights[2:])) == 4
    params = [p for p in net.parameters() if p.requires_grad]

    xg = x.clone().requires_grad_(True)
    y, logdet = blk(xg)
    loss = (c * ((a * y).reshape(shape[0], -1).sum(1) + logdet)).sum()
    got = torch.autograd.grad(loss, [xg] + params)

    xr = x.clone().requires_grad_(True)
    y_ref, est_ref = (_reference_neumann if neumann else _reference_estimate)(net, xr, v, weights)
    assert torch.allclose(y.detach(), y_ref.detach(), atol=1e-12)
    assert torch.allclose(logdet.detach(), est_ref.detach(), atol=1e-10)
    loss_ref = (c * ((a * y_ref).reshape(shape[0], -1).sum(1) + est_ref)).sum()
    expected = torch.autograd.grad(loss_ref, [xr] + params)
    names = ["x"] + [n for n, p in net.named_parameters() if p.requires_grad]
    for name, g, e in zip(names, got, expected):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-10 * max(1.0, float(e.abs().max()))), (name, (g - e).abs().max())
    assert blk.last_adjoint_iters > 2


def test_exact_logdet_gradients_equal_autograd_through_an_exact_solve():
    net = fc_branch()
    blk = exact_block(net, brute_force=True).train()
    x = torch.randn(4, 3, dtype=D64)
    params = list(net.parameters())
    xg = x.clone().requires_grad_(True)
    y, logdet = blk(xg)
    got = torch.autograd.grad((y.sum(1) * torch.arange(4.0, dtype=D64) + logdet).sum(), [xg] + params)
    xr = x.clone().requires_grad_(True)
    _, y_ref = exact_solve(net, xr)
    w_ref = (y_ref + xr) / SQRT2
    jac = batch_jacobian(net(w_ref), w_ref, create_graph=True)
    eye = torch.eye(3, dtype=D64)
    ld_ref = torch.linalg.slogdet(eye - jac)[1] - torch.linalg.slogdet(eye + jac)[1]
    expected = torch.autograd.grad((y_ref.sum(1) * torch.arange(4.0, dtype=D64) + ld_ref).sum(), [xr] + params)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-11)


def test_constructor_is_the_residual_blocks():
    """The same arguments as iResBlock (a caller picks the class); no new state_dict keys."""
    from resflows.layers import iResBlock

    net = fc_branch()
    kw = dict(n_power_series=None, n_dist="poisson", n_samples=1, n_exact_terms=10, neumann_grad=True, grad_in_forward=True)
    assert list(MonotoneBlock(net, **kw).state_dict()) == list(iResBlock(net, **kw).state_dict())


# -- activations --------------------------------------------------------------------------------------------------
def _pila_reference(z: float) -> float:
    k = 5.0
    return z if z > 0 else z * (k * k * z * z / 2 - k * z + 1) * math.exp(k * z)


def test_pila_and_cpila_values_and_derivatives():
    zs = [-3.0, -0.8, -0.454, -0.2, -1e-3, 0.0, 1e-3, 0.3, 2.5]
    z = torch.tensor(zs, dtype=D64, requires_grad=True)
    assert torch.allclose(pila(z), torch.tensor([_pila_reference(t) for t in zs], dtype=D64), rtol=1e-14, atol=1e-15)
    (auto,) = torch.autograd.grad(pila(z).sum(), z)
    assert torch.allclose(pila_slope(z), auto, rtol=1e-12)
    # C^2 at 0: P(0) = 0, P'(0) = 1, P''(0) = 0 from both sides
    (curv,) = torch.autograd.grad(pila_slope(z).sum(), z)
    assert abs(float(curv[zs.index(-1e-3)])) < 0.1 and float(curv[zs.index(1e-3)]) == 0.0
    assert float(pila(torch.tensor(-0.454, dtype=D64))) == pytest.approx(-0.2742, abs=1e-4)  # P's minimum
    x = torch.randn(4, 3, 2, 2, dtype=D64)
    y = CPila()(x)
    ref = torch.cat([torch.tensor([_pila_reference(t - 0.2) for t in x.flatten().tolist()], dtype=D64).reshape(x.shape),
                     torch.tensor([_pila_reference(-t - 0.2) for t in x.flatten().tolist()], dtype=D64).reshape(x.shape)], 1) / 1.06
    assert y.shape == (4, 6, 2, 2) and torch.allclose(y, ref, rtol=1e-13, atol=1e-15)
    assert float(CPila()(torch.zeros(1, 1))[0, 0]) == pytest.approx(-0.1735, abs=1e-4)


def test_cpila_lipschitz_bound_is_about_0_9989():
    x = torch.linspace(-4, 4, 80001, dtype=D64)
    rows = torch.sqrt(pila_slope(x - 0.2) ** 2 + pila_slope(-x - 0.2) ** 2) / CPILA_SCALE
    assert float(rows.max()) == pytest.approx(0.9989, abs=1e-4) and float(rows.max()) < 1.0
    assert abs(abs(float(x[rows.argmax()])) - 0.6) < 1e-3
    # against autograd: the Jacobian of CPila at a point is [P'(x - .2); -P'(-x - .2)] / 1.06 per element
    xs = torch.tensor([[-0.6, 0.6, 0.1, -2.0]], dtype=D64)
    jac = torch.autograd.functional.jacobian(lambda t: CPila()(t), xs).reshape(8, 4)
    expected = torch.cat([torch.diag(pila_slope(xs[0] - 0.2)), -torch.diag(pila_slope(-xs[0] - 0.2))]) / CPILA_SCALE
    assert torch.allclose(jac, expected, rtol=1e-12)


def test_activations_survive_large_inputs_in_float32():
    x = torch.tensor([[-1e4, -80.0, 80.0, 1e4, 3e38]], requires_grad=True)
    for act in (CPila(), Pila(), CReLU()):
        y = act(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(y).all() and torch.isfinite(g).all(), act


def test_crelu_and_registry():
    x = torch.tensor([[-1.0, 2.0]])
    assert torch.equal(CReLU()(x), torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    for name, cls in (("cpila", CPila), ("crelu", CReLU), ("pila", Pila)):
        m = make_activation(name)
        assert type(m) is cls and not list(m.state_dict())
    assert getattr(CPila, "out_multiplier") == 2 and getattr(CReLU, "out_multiplier") == 2
