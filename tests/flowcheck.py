"""Shared checks for flow layers: shapes, finiteness, inverse consistency and the exact log-det."""
from __future__ import annotations

import torch

from resflows.exact import jacobian_logdet


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
