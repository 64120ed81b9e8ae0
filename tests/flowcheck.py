"""Shared checks for flow layers: shapes, finiteness, inverse consistency and the exact log-det; and the
statistical checks of the stochastic log-det estimators (unbiased values and gradients)."""
from __future__ import annotations

import math

import torch

from resflows.exact import exact_logdet
from resflows.layers.jacobian import batch_jacobian, jacobian_logdet


def check_flow_layer(layer, x: torch.Tensor, rtol: float = 1e-6, inv_atol: float = 1e-8, check_jacobian: bool = True):
    """forward/inverse round trip, log-dets that cancel, and log-det == slogdet of the autograd Jacobian."""
    y, ld = layer(x)
    assert y.shape[0] == x.shape[0] and y[0].numel() == x[0].numel()
    assert ld.shape == (x.shape[0],)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    x_rec, ld_inv = layer.inverse(y)
    assert torch.allclose(x_rec, x, atol=inv_atol, rtol=0), (x_rec - x).abs().max()
    assert torch.allclose(ld_inv, -ld, atol=1e-8 + rtol * ld.abs().max().item(), rtol=0), (ld_inv + ld).abs().max()
    assert torch.allclose(layer.invert(y), x_rec, atol=inv_atol, rtol=0)
    if check_jacobian:
        _, exact = jacobian_logdet(lambda t: layer(t)[0], x)
        assert torch.allclose(ld, exact, rtol=rtol, atol=1e-10), (ld, exact)
    return y, ld


def mean_and_se(samples):
    """Mean and standard error over the first dimension of stacked samples."""
    s = torch.stack(samples)
    return s.mean(0), s.std(0) / math.sqrt(s.shape[0])


def repeated_estimates(block, x, repeats: int = 100, batch: int = 128):
    """Mean and standard error of independent log-det estimates at the single point ``x``: each forward draws
    its own series length, and a batch mean shares that draw, so the error is taken across forwards."""
    xs = x.expand(batch, *x.shape[1:])
    out = []
    for _ in range(repeats):
        with torch.no_grad():
            out.append(block(xs)[1].mean())
    return mean_and_se(out)


def estimate_and_exact(block, x, seed: int = 7):
    """``(mean, standard error, exact)`` of the block's log-det estimate at the single point ``x``."""
    _, exact = exact_logdet(block, x)
    torch.manual_seed(seed)
    mean, se = repeated_estimates(block, x)
    return mean.item(), se.item(), exact.item()


def param_grads(out, params):
    """d out / d params, zeros for parameters ``out`` does not depend on."""
    grads = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def exact_logdet_grads(block, x, params):
    """Gradients of the exact log det(I + J_g(x)) of a residual block at the single point ``x``."""
    x = x.detach().requires_grad_(True)
    jac = batch_jacobian(block.nnet(x), x, create_graph=True)[0]
    logdet = torch.linalg.slogdet(torch.eye(jac.shape[0], dtype=jac.dtype) + jac)[1]
    return param_grads(logdet, params)


def check_gradients_unbiased(block, x, draws: int, batch: int = 64):
    """The block's log-det gradient estimate, in 3 random parameter directions, averages to the exact
    gradient within 3 standard errors (over ``draws`` forwards of ``batch`` copies of the point ``x``)."""
    params = [p for p in block.nnet.parameters() if p.requires_grad]
    exact = torch.cat([g.reshape(-1) for g in exact_logdet_grads(block, x, params)])
    directions = torch.randn(3, exact.numel(), generator=torch.Generator().manual_seed(9), dtype=exact.dtype)
    torch.manual_seed(3)
    xs = x.expand(batch, *x.shape[1:])
    samples = []
    for _ in range(draws):
        _, ld = block(xs)
        samples.append(directions @ torch.cat([g.reshape(-1) for g in param_grads(ld.mean(), params)]))
    mean, se = mean_and_se(samples)
    target = directions @ exact
    assert torch.all((mean - target).abs() < 3 * se), (mean, target, se)
    return params
