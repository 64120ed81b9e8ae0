"""The variational dequantiser q(u | x) (resflows/layers/vardeq.py) against exact math in float64: its
log-density against the full Jacobian of eps -> u, each block invertible and Lipschitz < 1 in s for every x,
per-image shapes, the variational and importance-weighted bounds against a likelihood known in closed form
(and by quadrature), and the gradients of the bound in the default training path against written-out
gradients."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from resflows.evaluation import dequantization_bound
from resflows.layers import get_conv2d, iResBlock, lipschitz_layers
from resflows.layers.jacobian import batch_jacobian
from resflows.layers.monotone import MonotoneBlock
from resflows.layers.vardeq import InjectedDenseLayer, VariationalDequantizer, conditioned_branch, make_block
from resflows.losses import compute_loss
from tests.layers.test_linearize import randomize

D64 = torch.float64


def make_deq(ch=1, hw=(3, 3), nblocks=2, seed=0, gain=1.0, block_cls=iResBlock, **estimator):
    torch.manual_seed(seed)

    def conv(n_in, n_out, k):
        return get_conv2d(n_in, n_out, k, 1, k // 2, coeff=0.98, spatial_dims=hw)

    blocks = [make_block(block_cls, conditioned_branch(ch, 2, 4, "clipswish", conv, cond_width=4, cond_hidden=32), **estimator)
              for _ in range(nblocks)]
    deq = randomize(VariationalDequantizer(blocks), seed, weight_gain=gain)
    with torch.no_grad():  # randomised injections are large; scaled down, s (hence u) stays away from saturation
        for m in deq.modules():
            if isinstance(m, InjectedDenseLayer):
                for layer in (m.inject_layer.nnet[-1], m.inject_layer.match_channel):
                    layer.weight.mul_(0.1)
                    layer.bias.mul_(0.1)
    for m in lipschitz_layers(deq):
        m.update_lipschitz(n_iterations=None, atol=1e-12, rtol=1e-12, max_iterations=5000)
    return deq


def images(shape, seed, nvals=17):
    k = torch.randint(0, nvals, shape, generator=torch.Generator().manual_seed(seed))
    return (k / (nvals - 1)).to(D64)


def exact_logq(deq, eps, x):
    """log N(eps) - log|det du/deps| from the full Jacobian of the whole map eps -> u = sigmoid(T(eps; x))."""
    out = []
    for i in range(eps.shape[0]):
        xi = x[i:i + 1]

        def u_of(e):
            s = e.reshape(1, *eps.shape[1:])
            with deq.conditioned(xi):
                for block in deq.nnet:
                    s = block.transform(s)
            return torch.sigmoid(s).reshape(-1)

        jac = torch.autograd.functional.jacobian(u_of, eps[i].reshape(-1))
        log_n = (-0.5 * (math.log(2 * math.pi) + eps[i] ** 2)).sum()
        out.append(log_n - torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def test_log_q_equals_the_full_jacobian():
    deq = make_deq(brute_force=True).eval()
    x = images((3, 1, 3, 3), 1)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=D64)
    deq.noise_fn = lambda x: eps
    with torch.no_grad():
        u, logq = deq(x)
    assert u.shape == x.shape and logq.shape == (3,)
    assert bool(((u > 0) & (u < 1)).all())
    assert float(torch.logit(u).abs().max()) < 15  # so that the Jacobian of sigmoid keeps its digits in float64
    torch.testing.assert_close(logq, exact_logq(deq, eps, x), rtol=1e-10, atol=1e-10)


def tight_monotone_deq(**estimator):
    """A dequantiser of monotone blocks (--var-deq-mf True) whose solves run to float64 round-off."""
    deq = make_deq(block_cls=MonotoneBlock, **estimator)
    for b in deq.nnet:
        b.inverse_atol = b.inverse_rtol = b.adjoint_atol = b.adjoint_rtol = 1e-14
    return deq


def test_log_q_with_monotone_blocks_equals_the_full_jacobian():
    """--var-deq-mf True: the blocks are monotone (w + g(w; x) = sqrt(2) s, s' = sqrt(2) w - s); log q is still
    log N(eps) - log|det du/deps| of the whole map, each block's log-det exact (brute force)."""
    deq = tight_monotone_deq(brute_force=True).eval()
    x = images((3, 1, 3, 3), 1)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=D64)
    deq.noise_fn = lambda x: eps
    with torch.no_grad():
        u, logq = deq(x)
    assert u.shape == x.shape and logq.shape == (3,)
    torch.testing.assert_close(logq, exact_logq(deq, eps, x), rtol=1e-9, atol=1e-9)


def test_monotone_dequantizer_solve_gradients_match_finite_differences():
    """The implicit (adjoint) gradients of the monotone blocks' solves see the conditioning image in the backward
    pass too: d/dtheta of r . s(eps; x), every parameter (conditioning network included) along a random direction,
    against a central difference in float64."""
    deq = tight_monotone_deq()
    x = images((2, 1, 3, 3), 3)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=D64)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=D64)
    params = [p for p in deq.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(6)
    direction = [torch.randn(p.shape, generator=gen, dtype=D64) for p in params]

    def value():
        return (deq.flow(eps, x)[0] * r).sum()

    for b in deq.nnet:  # the weights as they are now: no power-iteration update between the evaluations
        b.nnet.eval()
    deq.zero_grad()
    value().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction))
    assert all(p.grad is not None for p in params)
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d, alpha=h)
        plus = value()
        for p, d in zip(params, direction):
            p.add_(d, alpha=-2 * h)
        minus = value()
        for p, d in zip(params, direction):
            p.add_(d, alpha=h)
    numeric = (plus - minus) / (2 * h)
    assert abs(float(analytic - numeric)) <= 1e-6 * max(1.0, abs(float(numeric))), (float(analytic), float(numeric))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_default_path"])
def test_log_q_estimate_is_unbiased(train):
    """The stochastic estimate (the main flow's estimator: eval roulette, or the default training path) has the
    exact log q as its mean, within 4 standard errors."""
    deq = make_deq(n_dist="poisson", n_exact_terms=2, neumann_grad=True, grad_in_forward=True).train(train)
    x = images((1, 1, 3, 3), 3)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=D64)
    exact = exact_logq(deq, eps, x)
    reps = 256
    deq.noise_fn = lambda x: eps.expand(reps, -1, -1, -1)
    torch.manual_seed(5)
    _, logq = deq(x.expand(reps, -1, -1, -1))
    assert logq.shape == (reps,)
    mean, se = logq.detach().mean(), logq.detach().std() / math.sqrt(reps)
    assert se > 0 and abs(float(mean - exact[0])) < 4 * float(se) + 1e-9


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["x_in_0_1", "x_large"])
def test_every_block_is_invertible_and_contractive_in_s(scale):
    deq = make_deq(nblocks=2, gain=4.0).eval()
    x = images((4, 1, 3, 3), 6) * scale
    s = 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=D64)
    with deq.conditioned(x):
        for block in deq.nnet:
            block.inverse_atol = block.inverse_rtol = 1e-12
            s_ = s.clone().requires_grad_(True)
            g = block.nnet(s_)
            jac = batch_jacobian(g, s_)  # [B, D, D]: dg/ds, the injection of x contributes nothing
            lip = torch.linalg.matrix_norm(jac, ord=2)
            assert float(lip.max()) < 1.0
            y = block.transform(s)
            torch.testing.assert_close(block.invert(y), s, rtol=1e-6, atol=1e-6)  # the stopping rule compares squared steps with tol
    # The blocks do depend on x (the injection moves the activations): another x gives another map.
    with deq.conditioned(x.flip(0)):
        other = deq.nnet[0].transform(s)
    with deq.conditioned(x):
        assert not torch.allclose(other, deq.nnet[0].transform(s))


class GaussianPixels(nn.Module):
    """A flow whose density is known: independent pixels y_i ~ N(m_i, sd^2), with the dequantiser in front."""

    def __init__(self, deq, mean, log_sd):
        super().__init__()
        self.dequantizer = deq
        self.mean = nn.Parameter(mean)
        self.log_sd = nn.Parameter(torch.tensor(log_sd, dtype=D64))

    def dequantize(self, x, nvals):
        u, logq = self.dequantizer(x)
        return ((nvals - 1) * x + u) / nvals, logq

    def forward(self, y):
        z = ((y - self.mean) / self.log_sd.exp()).reshape(y.shape[0], -1)
        return z, -self.log_sd * z.shape[1] * torch.ones(y.shape[0], dtype=y.dtype)


NV = 17
CFG = SimpleNamespace(task="density", var_deq=True, padding=0, padding_dist="uniform")
SHAPE = (1, 1, 2)  # two pixels


def two_pixel_case():
    deq = make_deq(hw=(1, 2), brute_force=True).eval()
    k = torch.tensor([[[[3.0, 12.0]]]], dtype=D64)
    x = k / (NV - 1)
    # Bin widths 1/17; the density varies by a factor ~e^3 across each bin: uniform noise would be far from it.
    mean = ((k + torch.tensor([0.2, 0.9], dtype=D64).reshape(1, 1, 1, 2)) / NV)
    model = GaussianPixels(deq, mean, math.log(0.35 / NV))
    lo, hi = k / NV, (k + 1) / NV
    sd = math.exp(model.log_sd.item())
    exact = torch.log(torch.special.ndtr((hi - mean) / sd) - torch.special.ndtr((lo - mean) / sd)).sum()
    # The same by quadrature of the density over each bin (independent pixels: a product of 1-D integrals).
    t = torch.linspace(0, 1, 200001, dtype=D64).reshape(-1, 1)
    y = lo.reshape(1, 2) + t * (hi - lo).reshape(1, 2)
    dens = torch.exp(-0.5 * ((y - mean.reshape(1, 2)) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    quad = torch.log(torch.trapezoid(dens, y, dim=0)).sum()
    torch.testing.assert_close(quad, exact, rtol=1e-9, atol=1e-9)
    return model, x, float(exact)


def test_bounds_stay_below_the_likelihood_and_the_iw_bound_rises_with_k():
    model, x, log_p = two_pixel_case()
    d_ln2 = 2 * math.log(2)
    reps = 400
    xb = x.expand(reps, -1, -1, -1)
    torch.manual_seed(0)
    means = {}
    with torch.no_grad():
        single = -compute_loss(_Forward(model), xb, None, CFG, SHAPE, NV).bpd * d_ln2
        means[1] = (float(single.mean()), float(single.std() / math.sqrt(reps)))
        for k in (4, 16, 64):
            lb = -dequantization_bound(model, xb, None, CFG, SHAPE, NV, k).bpd * d_ln2
            assert lb.shape == (reps,)
            means[k] = (float(lb.mean()), float(lb.std() / math.sqrt(reps)))
    for k, (m, se) in means.items():
        assert m <= log_p + 3 * se, (k, m, se, log_p)
    ks = sorted(means)
    for a, b in zip(ks, ks[1:]):
        assert means[b][0] > means[a][0] - 3 * (means[a][1] + means[b][1]), (a, b, means)
    gap1, gap64 = log_p - means[1][0], log_p - means[64][0]
    assert gap1 > 10 * means[1][1]  # a random q is clearly loose: the single-sample bound is below
    assert gap64 < 0.25 * gap1  # and K = 64 importance samples close most of the gap


def _vardeq_forward(model, x, nvals):
    y, logq = model.dequantize(x, nvals)
    z, logdet = model(y)
    return z, logdet, logq


class _Forward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, mode="density", nvals=256):
        return _vardeq_forward(self.model, x, nvals)


def _fix_draws(deq, probes):
    for block, probe in zip(deq.nnet, probes):
        block.probe_fn = lambda x, p=probe: p
        block.generator = torch.Generator().manual_seed(4)


MODES = {"naive": (False, False), "default": (True, True), "neumann": (True, False)}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_bound_gradients_equal_the_written_out_ones(mode):
    """Gradients of a weighted sum of per-image bounds (training mode: a fixed probe and roulette draw per block)
    against the same estimator written out from the full Jacobians of the blocks, by autograd in float64."""
    neumann, mem_eff = MODES[mode]
    deq = make_deq(hw=(2, 2), n_dist="geometric", n_exact_terms=2, neumann_grad=neumann, grad_in_forward=mem_eff).train()
    x = images((3, 1, 2, 2), 8)
    mean = torch.full((1, 1, 2, 2), 0.4, dtype=D64)
    model = GaussianPixels(deq, mean, math.log(0.3))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=D64)
    probes = [torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i), dtype=D64) for i in range(2)]
    deq.noise_fn = lambda x: eps
    a = torch.tensor([0.5, 2.0, -1.0], dtype=D64)  # unequal weights per image
    params = [p for p in model.parameters() if p.requires_grad]

    _fix_draws(deq, probes)
    bpd = compute_loss(_Forward(model), x, None, CFG, (1, 2, 2), NV).bpd
    assert bpd.shape == (3,)
    got = torch.autograd.grad((a * bpd).sum(), params, allow_unused=True)

    # Written out: s_{k+1} = s_k + g_k(s_k); log-det_k = sum_j c_j w_j v^T J^j v (value); gradient through it
    # (naive), or through n^T J v with n = sum_j (-1)^j w_j (J^T)^j v held fixed (Neumann, eq. 8).
    _fix_draws(deq, probes)
    s, total_ld = eps, torch.zeros(3, dtype=D64)
    with deq.conditioned(x):
        for block, probe in zip(deq.nnet, probes):
            weights, _ = block.series_plan()
            s_ = s if s.requires_grad else s.clone().requires_grad_(True)
            g = block.nnet(s_)
            jac = batch_jacobian(g, s_, create_graph=True)
            v = probe.reshape(3, -1)
            value, row, n = torch.zeros(3, dtype=D64), v, v.clone()
            for j, w in enumerate(weights, start=1):
                row = torch.einsum("bi,bij->bj", row, jac)
                value = value + (-1) ** (j + 1) * w / j * (row * v).sum(1)
                n = n + (-1) ** j * w * row
            if neumann:
                sur = (n.detach() * torch.einsum("bij,bj->bi", jac, v)).sum(1)
                value = value.detach() + sur - sur.detach()
            total_ld = total_ld + value
            s = s_ + g
    logq = (-0.5 * (math.log(2 * math.pi) + eps**2)).reshape(3, -1).sum(1) - total_ld \
        - (nn.functional.logsigmoid(s) + nn.functional.logsigmoid(-s)).reshape(3, -1).sum(1)
    y = ((NV - 1) * x + torch.sigmoid(s)) / NV
    z, logdet = model(y)
    log_w = (-0.5 * (math.log(2 * math.pi) + z**2)).sum(1) + logdet - 4 * math.log(NV) - logq
    ref_bpd = -log_w / (4 * math.log(2))
    torch.testing.assert_close(bpd.detach(), ref_bpd.detach(), rtol=1e-9, atol=1e-9)
    expected = torch.autograd.grad((a * ref_bpd).sum(), params, allow_unused=True)
    assert sum(gr is not None and bool(gr.abs().sum() > 0) for gr in got) > len(params) // 2  # the cond. nets learn too
    scale = max(float(g.abs().max()) for g in expected if g is not None)
    for i, (g1, g2) in enumerate(zip(got, expected)):
        g1 = torch.zeros_like(params[i]) if g1 is None else g1
        g2 = torch.zeros_like(params[i]) if g2 is None else g2
        torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9 * scale, msg=lambda m: f"parameter {i}: {m}")
    if mode == "default":
        assert all(block.linearizable for block in deq.nnet)  # really the hand-written linearised path
