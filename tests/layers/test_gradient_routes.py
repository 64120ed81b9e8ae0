"""Every gradient mode and route of iResBlock against gradients written out from the full Jacobian, on a
fixed probe and a fixed Russian-roulette draw, with samples weighted unequally (float64).

Modes: naive (``neumann_grad=False, grad_in_forward=False``), Neumann only, mem-eff only (naive gradients
formed in the block's backward) and both (the default). Routes: the hand-written linearisation and
``use_linearize=False`` (autograd). Naive and Neumann are different estimators of the same gradient: for
one probe ``v`` the naive gradient differentiates ``sum_k c_k v^T J^k v`` while the Neumann one is
``sum_k c'_k v^T J^k dJ v``; they agree in expectation over probes (tested in test_iresblock.py), not per
probe. So each mode is compared with its own formula, and modes sharing a formula with each other.
"""
import copy

import pytest
import torch
import torch.nn as nn

from resflows.layers import LipSwish, MaxMin, get_linear, iResBlock
from resflows.layers import iresblock as iresblock_module
from resflows.layers.jacobian import batch_jacobian
from tests.layers.test_linearize import HalvedELU, act_choices, inputs, model_branches, randomize

D64 = torch.float64
RTOL = 1e-8
MODES = {"naive": (False, False), "neumann": (True, False), "mem_eff": (False, True), "both": (True, True)}
A = torch.tensor([0.1, -2.0, 3.0], dtype=D64)  # per-sample weights of the log-det in the loss


def make_block(nnet: nn.Module) -> iResBlock:
    block = iResBlock(nnet, n_dist="geometric", geom_p=0.5, n_exact_terms=2).train()
    return block


def setup(block0, mode, linearised, x0, probe):
    block = copy.deepcopy(block0)
    block.neumann_grad, block.grad_in_forward = MODES[mode]
    block.use_linearize = linearised
    block.probe_fn = lambda x: probe
    block.generator = torch.Generator().manual_seed(4)  # the same draw of N every time: 6 terms
    return block


def loss_terms(x0):
    c = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8), dtype=D64)
    return A, c


def run(block0, mode, linearised, x0, probe):
    """Value of the log-det and the gradients of sum_i a_i logdet_i + sum c * y w.r.t. x and every parameter."""
    block = setup(block0, mode, linearised, x0, probe)
    a, c = loss_terms(x0)
    x = x0.clone().requires_grad_(True)
    params = [p for p in block.nnet.parameters() if p.requires_grad]
    torch.manual_seed(5)  # dropout masks
    y, ld = block(x)
    grads = torch.autograd.grad((a * ld).sum() + (c * y).sum(), [x] + params, allow_unused=True)
    return block, ld.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip([x] + params, grads)]


def written_out(block0, neumann, x0, probe):
    """The same quantities from the full per-example Jacobian J (D x D):
    logdet_i = sum_k (-1)^(k+1) w_k / k v^T J^k v;
    naive gradient: d/dtheta of sum_i a_i logdet_i;
    Neumann gradient (eq. 8): d/dtheta of sum_i a_i n_i^T J v with n_i = sum_{k=0}^K (-1)^k w_k (J^T)^k v held fixed;
    plus d/dtheta of sum c * (x + g(x)) in both."""
    block = setup(block0, "naive", False, x0, probe)
    weights, _ = block.series_plan()
    a, c = loss_terms(x0)
    x = x0.clone().requires_grad_(True)
    params = [p for p in block.nnet.parameters() if p.requires_grad]
    torch.manual_seed(5)
    g = block.nnet(x)
    jac = batch_jacobian(g, x, create_graph=True)
    v = probe.reshape(x.shape[0], -1)
    logdet, row, n = torch.zeros_like(a), v, v.clone()
    for k, w in enumerate(weights, start=1):
        row = torch.einsum("bi,bij->bj", row, jac)  # v^T J^k
        logdet = logdet + (-1) ** (k + 1) * w / k * (row * v).sum(1)
        n = n + (-1) ** k * w * row
    if neumann:
        jv = torch.einsum("bij,bj->bi", jac, v)
        objective = (a * (n.detach() * jv).sum(1)).sum()
    else:
        objective = (a * logdet).sum()
    objective = objective + (c * (x + g)).sum()
    grads = torch.autograd.grad(objective, [x] + params, allow_unused=True)
    return weights, logdet.detach(), [torch.zeros_like(t) if gr is None else gr for t, gr in zip([x] + params, grads)]


def assert_all_close(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        scale = max(float(b.abs().max()), 1e-6)
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}, tensor {i}: {m}")


def _branch(act, kind):
    # One channel of 4x4 (D = 16): the written-out gradients differentiate all D rows of the Jacobian.
    return randomize(model_branches(act, input_size=(1, 4, 4), idim=4)[kind], 3, weight_gain=2.0)


# Convolutional branches of the other activations take longer (model build, 16 Jacobian rows through
# convolutions): in the slow suite. Every activation's fc branch, and the default (swish) and CelebA-HQ
# (elu) convolutional ones run by default.
ROUTE_CASES = [pytest.param(act, kind, marks=[pytest.mark.slow] if kind == "conv" and act not in ("swish", "elu") else [])
               for act in act_choices() for kind in ("conv", "fc")]


@pytest.mark.parametrize("act,kind", ROUTE_CASES)
def test_every_mode_and_route_equals_its_formula(act, kind):
    block0 = make_block(_branch(act, kind))
    x0 = inputs((3, 1, 4, 4), 4, scale=1.0)
    probe = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=D64)
    weights, _ = setup(block0, "naive", False, x0, probe).series_plan()
    assert len(weights) >= 4 and any(w != 1 for w in weights)  # roulette weights, not only exact terms
    reference = {neumann: written_out(block0, neumann, x0, probe) for neumann in (False, True)}
    for mode, (neumann, _) in MODES.items():
        _, logdet_ref, grads_ref = reference[neumann]
        for linearised in (True, False):
            block, logdet, grads = run(block0, mode, linearised, x0, probe)
            what = f"{mode}, {'linearised' if linearised else 'autograd'}"
            if mode == "both" and linearised:
                assert block.linearizable  # the default path really went through linearize
            assert_all_close([logdet], [logdet_ref], what + " (log-det value)")
            assert_all_close(grads, grads_ref, what)


@pytest.mark.parametrize("odd", [HalvedELU(), MaxMin()], ids=["subclass", "maxmin"])
def test_autograd_fallback_with_neumann_gradients(odd, monkeypatch):
    """A branch linearize does not accept takes _DeferredLogDet (the per-sample-weighted Neumann gradient
    formed in the block's backward), and its gradients are the written-out ones."""
    torch.manual_seed(0)
    net = nn.Sequential(get_linear(32, 16, coeff=0.9), odd, get_linear(16, 32, coeff=0.9), LipSwish())
    net = randomize(net, 3, weight_gain=2.0)
    calls = []
    real = iresblock_module._DeferredLogDet.apply
    monkeypatch.setattr(iresblock_module._DeferredLogDet, "apply", lambda *a: calls.append(1) or real(*a))
    block0 = make_block(net)
    x0 = inputs((3, 32), 4, scale=1.0)
    probe = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=D64)
    _, logdet_ref, grads_ref = written_out(block0, True, x0, probe)
    block, logdet, grads = run(block0, "both", True, x0, probe)
    assert not block.linearizable and calls == [1]
    assert_all_close([logdet], [logdet_ref], "fallback log-det")
    assert_all_close(grads, grads_ref, "fallback gradients")
