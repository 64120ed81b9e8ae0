"""i-DenseNets branches (resflows/layers/dense.py): concatenation weights, Lipschitz bound, log-det estimates,
gradient modes and the linearised fast path, all against exact answers in float64."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from resflows.layers import (
    CLipSwish,
    LeakyLSwish,
    LipschitzDenseLayer,
    LipSwish,
    get_conv2d,
    get_linear,
    iResBlock,
    linearize,
    lipschitz_layers,
)
from resflows.layers.dense import dense_conv_layers, dense_fc_layers
from resflows.layers.jacobian import per_example_jacobian
from tests.flowcheck import check_flow_layer, check_gradients_unbiased, estimate_and_exact

D64 = torch.float64
SHAPES = {"conv": (2, 3, 3), "fc": (6,)}


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: thread synchronisation costs more than the work, ten times more on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dense_branch(kind, act="clipswish", coeff=0.9, lip_coeff=0.95, depth=2, growth=4, learnable=True, batchnorm=False,
                 seed=0, gain=3.0, k_scale=2.0):
    """A small dense branch with random weights scaled up by ``gain`` (so every normalisation is active),
    random K and converged power iterations."""
    torch.manual_seed(seed)
    if kind == "conv":
        net = dense_conv_layers(2, depth, growth, act, lambda i, o, k: get_conv2d(i, o, k, 1, k // 2, coeff=coeff, spatial_dims=(3, 3)),
                                batchnorm=batchnorm, learnable_concat=learnable, lip_coeff=lip_coeff)
    else:
        net = dense_fc_layers(6, depth, growth, act, lambda i, o: get_linear(i, o, coeff=coeff), learnable_concat=learnable,
                              lip_coeff=lip_coeff, hidden=5)
    net = net.double()
    with torch.no_grad():
        for m in lipschitz_layers(net):
            m.weight.mul_(gain)
        for m in net.modules():
            if isinstance(m, LipschitzDenseLayer):
                m.K1_unnormalized.copy_(k_scale * torch.randn(1))
                m.K2_unnormalized.copy_(k_scale * torch.randn(1))
            if isinstance(m, (LipSwish, CLipSwish, LeakyLSwish)):
                for p in m.parameters():
                    p.add_(0.5 * torch.randn_like(p))
    exact_power_vectors(net)
    return net


@torch.no_grad()
def exact_power_vectors(net):
    """Set every normalised layer's u, v to the top singular vectors of its whole linear map (from an SVD of
    the small dense matrix), so sigma is exact: what converged power iterations approach."""
    for m in lipschitz_layers(net):
        n_in = m.v.numel()
        cols = torch.stack([m._matvec(m.weight, e) for e in torch.eye(n_in, dtype=m.weight.dtype)], 1)
        u, s, vh = torch.linalg.svd(cols)
        m.u.copy_(u[:, 0])
        m.v.copy_(vh[0])
        m.refresh_scale()
        assert torch.allclose(m.scale, s[0], rtol=1e-12)


def inputs(kind, n=3, seed=5):
    return torch.randn(n, *SHAPES[kind], generator=torch.Generator().manual_seed(seed), dtype=D64)


# -- the concatenation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("learnable", [True, False])
def test_concatenation_weights(learnable):
    layer = LipschitzDenseLayer(nn.Identity(), learnable_concat=learnable, lip_coeff=0.9).double()
    names = [n for n, _ in layer.named_parameters()]
    assert names == (["K1_unnormalized", "K2_unnormalized"] if learnable else [])
    assert list(layer.state_dict()) == ["K1_unnormalized", "K2_unnormalized"]
    assert layer.K1_unnormalized.tolist() == [1.0] and layer.K2_unnormalized.tolist() == [1.0]
    for k1, k2 in [(1.0, 1.0), (-30.0, 4.0), (7.0, -2.0), (0.3, 0.2)]:
        with torch.no_grad():
            layer.K1_unnormalized.fill_(k1)
            layer.K2_unnormalized.fill_(k2)
        e1, e2 = layer.etas()
        s1, s2 = F.softplus(torch.tensor(k1, dtype=D64)) + 0.1, F.softplus(torch.tensor(k2, dtype=D64)) + 0.1
        assert torch.allclose(e1, 0.9 * s1 / torch.sqrt(s1**2 + s2**2), rtol=1e-14)
        assert torch.allclose(e1**2 + e2**2, torch.tensor(0.81, dtype=D64), rtol=1e-14)
        x = torch.randn(2, 3, dtype=D64)
        assert torch.equal(layer(x), torch.cat([e1 * x, e2 * x], 1))
    layer.reset_concat()
    assert layer.K1_unnormalized.tolist() == [1.0] and layer.K2_unnormalized.tolist() == [1.0]


def test_clipswish_is_lipswish_of_the_channel_concatenation():
    act = CLipSwish().double()
    with torch.no_grad():
        act.swish.beta.fill_(0.7)
    x = torch.randn(2, 3, 4, 4, dtype=D64)
    b = F.softplus(torch.tensor(0.7, dtype=D64))
    h = torch.cat([x, -x], 1)
    assert torch.equal(act(x), act.swish(h) / 1.004)
    assert torch.allclose(act(x), h * torch.sigmoid(h * b) / 1.1 / 1.004, rtol=1e-15)
    assert list(act.state_dict()) == ["swish.beta"]


def test_leakylswish_formula():
    act = LeakyLSwish().double()
    assert act.alpha.tolist() == [-3.0] and act.swish.beta.tolist() == [0.5]
    x = torch.linspace(-10, 10, 101, dtype=D64)
    a = torch.sigmoid(torch.tensor(-3.0, dtype=D64))
    assert torch.allclose(act(x), a * x + (1 - a) * x * torch.sigmoid(x * F.softplus(torch.tensor(0.5, dtype=D64))) / 1.1)


def test_odd_growth_is_refused_for_concatenating_activations():
    with pytest.raises(ValueError, match="divisible by 2"):
        dense_fc_layers(4, 1, 3, "clipswish", lambda i, o: get_linear(i, o))


# -- Lipschitz bound -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("act", ["clipswish", "swish", "leakylswish"])
@pytest.mark.parametrize("seed", [0, 1])
def test_branch_lipschitz_constant_is_at_most_coeff(kind, act, seed):
    """Largest singular value of the branch's Jacobian at random points, for random weights and K: <= coeff.
    With lip_coeff = 1 the bound is the final layer's coeff alone, so nothing else may add slack."""
    coeff = 0.9
    for lip_coeff in (1.0, 0.95):
        net = dense_branch(kind, act=act, coeff=coeff, lip_coeff=lip_coeff, seed=seed)
        x = inputs(kind, n=4, seed=seed) * 2
        sv = torch.linalg.matrix_norm(per_example_jacobian(net, x), ord=2)
        assert sv.max().item() <= coeff * (1 + 1e-9), sv


def test_each_dense_layer_is_lipschitz_lip_coeff():
    """One dense layer alone: sigma_max(J) <= lip_coeff, and close to it (the x part alone gives eta1)."""
    net = dense_branch("conv", coeff=1.0, lip_coeff=0.8, depth=1, seed=3)
    layer = net[0]
    x = inputs("conv", n=4)
    sv = torch.linalg.matrix_norm(per_example_jacobian(layer, x), ord=2)
    eta1, _ = layer.etas()
    assert sv.max().item() <= 0.8 * (1 + 1e-9)
    assert sv.min().item() >= eta1.item() * (1 - 1e-9)


# -- residual blocks with dense branches --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_block_forward_inverse_and_exact_logdet(kind):
    block = iResBlock(dense_branch(kind), brute_force=True)
    block.inverse_atol, block.inverse_rtol = 1e-22, 0.0
    check_flow_layer(block, inputs(kind), rtol=1e-8, inv_atol=1e-9)


@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("training", [True, False])
def test_logdet_estimate_is_unbiased(kind, training):
    x = inputs(kind, n=1)
    block = iResBlock(dense_branch(kind), n_dist="geometric").train(training)
    assert block.linearizable
    mean, se, exact = estimate_and_exact(block, x)
    assert abs(mean - exact) < 3 * se, (mean, exact, se)


def test_truncated_series_fails_the_unbiasedness_check():
    """The check above can fail: one term of the series is biased by many standard errors."""
    x = inputs("conv", n=1)
    block = iResBlock(dense_branch("conv"), n_power_series=1).train()
    mean, se, exact = estimate_and_exact(block, x)
    assert abs(mean - exact) > 5 * se


MODES = [(True, True, True), (True, True, False), (True, False, True), (False, False, True), (False, True, True)]


@pytest.mark.parametrize("neumann,mem_eff,fast", MODES)
def test_gradient_estimators_are_unbiased(neumann, mem_eff, fast):
    """Every gradient mode (Neumann or not, memory-efficient or not, linearised or autograd) against the
    exact gradient of log det(I + J_g) with respect to every branch parameter, K included."""
    x = inputs("conv", n=1)
    block = iResBlock(dense_branch("conv"), neumann_grad=neumann, grad_in_forward=mem_eff).train()
    block.use_linearize = fast
    assert any(p.shape == (1,) for p in block.nnet.parameters() if p.requires_grad)  # K, beta
    check_gradients_unbiased(block, x, draws=60)


@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("neumann", [True, False])
def test_gradient_modes_agree_exactly_on_the_same_draws(kind, neumann):
    """Same probes and series lengths, a loss weighting samples unequally: the memory-efficient and plain
    paths, and the linearised and autograd products, give the same log-dets and gradients."""
    x0 = inputs(kind, n=5, seed=1) * 0.5
    a = torch.tensor([0.1, -2.0, 3.0, 0.7, 1.5], dtype=D64)
    c = torch.randn(5, *SHAPES[kind], generator=torch.Generator().manual_seed(2), dtype=D64)
    results = []
    for mem_eff, fast in [(False, True), (True, True), (True, False), (False, False)]:
        block = iResBlock(dense_branch(kind, batchnorm=kind == "conv"), neumann_grad=neumann, grad_in_forward=mem_eff).train()
        block.use_linearize = fast
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(21)
        y, ld = block(x)
        loss = (a * ld).sum() + (c * y).sum()
        params = [p for p in block.nnet.parameters() if p.requires_grad]
        results.append((y.detach(), ld.detach(), torch.autograd.grad(loss, [x] + params)))
    y0, ld0, g0 = results[0]
    for y1, ld1, g1 in results[1:]:
        assert torch.allclose(y0, y1, rtol=1e-12, atol=1e-14)
        assert torch.allclose(ld0, ld1, rtol=1e-10, atol=1e-12)
        for u, v in zip(g0, g1):
            assert torch.allclose(u, v, rtol=1e-8, atol=1e-11), (u - v).abs().max()


# -- the linearised fast path ------------------------------------------------------------------------------
BRANCHES = [
    ("conv", "clipswish", True, False),
    ("conv", "clipswish", False, True),
    ("conv", "swish", True, True),
    ("conv", "leakylswish", True, False),
    ("fc", "clipswish", True, False),
    ("fc", "leakylswish", False, False),
    ("fc", "elu", True, False),
]


def _close(a, b, tol=1e-10):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("kind,act,learnable,batchnorm", BRANCHES)
def test_linearisation_is_exact(kind, act, learnable, batchnorm):
    """primal, vector-Jacobian products, Jacobian-vector products and the double-backward gradient of
    u^T J v + a^T g equal autograd's to 1e-10 (float64)."""
    net = dense_branch(kind, act=act, learnable=learnable, batchnorm=batchnorm).eval()  # eval: batch norm uses fixed means
    assert linearize.supports(net)
    x = inputs(kind, n=3)
    y, tape = linearize.primal(net, x)
    ref = net(x)
    assert _close(y, ref)
    xg = x.clone().requires_grad_(True)
    g = net(xg)
    for seed in (1, 2):
        w = torch.randn(g.shape, generator=torch.Generator().manual_seed(seed), dtype=D64)
        (vjp_ref,) = torch.autograd.grad(g, xg, w, retain_graph=True)
        assert _close(linearize.tape_vjp(tape, w), vjp_ref)
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=D64)
    u = torch.randn(g.shape, generator=torch.Generator().manual_seed(4), dtype=D64)
    a = torch.randn(g.shape, generator=torch.Generator().manual_seed(6), dtype=D64)
    _, jvp_ref = torch.func.jvp(net, (x,), (t,))
    params = [p for p in net.parameters() if p.requires_grad]
    assert any(isinstance(m, LipschitzDenseLayer) and m.K1_unnormalized.requires_grad for m in net.modules()) == learnable
    for stripped in (False, True):
        xd = x.clone().requires_grad_(True)
        gd, jv = linearize.dual(net, xd, t, linearize.strip_tape(tape) if stripped else tape)
        assert _close(gd, ref) and _close(jv, jvp_ref)
        grads = torch.autograd.grad((a * gd).sum() + (u * jv).sum(), [xd] + params)
        xr = x.clone().requires_grad_(True)
        gr = net(xr)
        (uj,) = torch.autograd.grad(gr, xr, u, create_graph=True)
        grads_ref = torch.autograd.grad((a * gr).sum() + (uj * t).sum(), [xr] + params)
        for got, want in zip(grads, grads_ref):
            assert _close(got, want), (got - want).abs().max()


def test_linearised_training_reuses_the_batch_norm_means_of_its_forward():
    """In training the batch norm's running mean moves once per forward; the linearised backward must use
    the mean its forward used (recorded on the nested tape), as autograd does."""
    x = inputs("conv", n=4)
    grads = []
    for fast in (True, False):
        block = iResBlock(dense_branch("conv", batchnorm=True)).train()
        block.use_linearize = fast
        torch.manual_seed(2)
        y, ld = block(x.clone().requires_grad_(True))
        params = [p for p in block.nnet.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(y.sum() + ld.sum(), params))
    for u, v in zip(*grads):
        assert torch.allclose(u, v, rtol=1e-9, atol=1e-12)
