"""Batched power iterations (update_lipschitz over groups of same-shaped layers) == one layer at a time."""
import copy

import torch
import torch.nn as nn

from resflows.layers import get_conv2d, get_linear, update_lipschitz
from resflows.layers.lipschitz import InducedNorm


def _layers():
    torch.manual_seed(0)
    return nn.ModuleList(
        [get_linear(3, 5, coeff=0.9) for _ in range(3)]
        + [get_linear(5, 5, coeff=0.9), get_linear(5, 5, coeff=0.9, domain=2, codomain=3)]  # last: not batched
        + [get_conv2d(4, 6, 1, coeff=0.9) for _ in range(2)]
        + [get_linear(5, 2, coeff=0.9, domain=1, codomain=2)]  # closed form
    ).double()


def test_batched_power_steps_match_one_layer_at_a_time():
    a = _layers()
    for m in a:  # move the weights away from the state the power vectors converged to at construction
        with torch.no_grad():
            m.weight.add_(torch.randn_like(m.weight))
    b = copy.deepcopy(a)
    update_lipschitz(list(a), n_iterations=3)
    for _ in range(3):
        for m in b:
            m.power_step()
    for m in b:
        m.refresh_scale()
    for ma, mb in zip(a, b):
        if isinstance(ma, InducedNorm):
            assert torch.allclose(ma.u, mb.u, atol=1e-12) and torch.allclose(ma.v, mb.v, atol=1e-12)
        assert torch.allclose(ma.scale, mb.scale, atol=1e-12)
        assert float(ma.scale) > 0
