"""Lipschitz DenseNet residual branches (Perugachi-Diaz, Tomczak and Bhulai, "Invertible DenseNets", 2021).

A dense layer maps ``x`` to ``concat(eta1 * x, eta2 * network(x))`` along the channels, where ``network`` is a
normalised convolution (or linear layer) followed by an activation. For ``||.||_2``,
``||concat(a, b)||^2 = ||a||^2 + ||b||^2``, so with ``Lip(network) <= 1`` the layer is Lipschitz with constant
``sqrt(eta1^2 + eta2^2)``. The concatenation weights are

    eta_i = lip_coeff * (softplus(K_i) + 0.1) / sqrt((softplus(K_1) + 0.1)^2 + (softplus(K_2) + 0.1)^2),

so ``eta1^2 + eta2^2 = lip_coeff^2`` whatever ``K``; the 0.1 keeps either part from being switched off.
A branch of dense layers ending in a normalised 1x1 convolution (linear layer) back to the input width is
therefore Lipschitz ``<= coeff * lip_coeff^depth``, and can be the ``g`` of an invertible residual block.

Module and attribute names follow the fork's code, so ``state_dict`` keys are
``nnet.<i>.K1_unnormalized``, ``nnet.<i>.network.0.weight``, ... and its checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import linearize
from .activations import make_activation
from .normalization import MovingBatchNorm2d

Tensor = torch.Tensor

__all__ = ["LipschitzDenseLayer", "dense_conv_layers", "dense_fc_layers", "dense_layers", "FC_DENSE_HIDDEN"]

# Width of the first linear layer of a fully connected dense branch (fixed in the fork's code).
FC_DENSE_HIDDEN = 64
_ETA_FLOOR = 0.1


class LipschitzDenseLayer(nn.Module):
    """``concat(eta1 * x, eta2 * network(x))`` along dim 1 with ``eta1^2 + eta2^2 = lip_coeff^2``.

    ``K1_unnormalized`` and ``K2_unnormalized`` start at ``init_k`` (1 in the fork); they are parameters
    with ``learnable_concat`` and fixed buffers otherwise (same state_dict keys either way).
    """

    def __init__(self, network: nn.Module, learnable_concat: bool = True, lip_coeff: float = 0.98, init_k: float = 1.0):
        super().__init__()
        self.lip_coeff, self.init_k, self.learnable_concat = float(lip_coeff), float(init_k), learnable_concat
        for name in ("K1_unnormalized", "K2_unnormalized"):
            k = torch.tensor([self.init_k])
            if learnable_concat:
                setattr(self, name, nn.Parameter(k))
            else:
                self.register_buffer(name, k)
        self.network = network

    def etas(self) -> Tuple[Tensor, Tensor]:
        """(eta1, eta2), each of shape [1], differentiable in K when it is learned."""
        e1 = F.softplus(self.K1_unnormalized) + _ETA_FLOOR
        e2 = F.softplus(self.K2_unnormalized) + _ETA_FLOOR
        norm = torch.sqrt(e1 * e1 + e2 * e2)
        return self.lip_coeff * e1 / norm, self.lip_coeff * e2 / norm

    def forward(self, x: Tensor) -> Tensor:
        eta1, eta2 = self.etas()
        return torch.cat([eta1 * x, eta2 * self.network(x)], 1)

    @torch.no_grad()
    def reset_concat(self) -> None:
        """Put K back to its initial value (i-DenseNets hold it there for the first epochs)."""
        self.K1_unnormalized.fill_(self.init_k)
        self.K2_unnormalized.fill_(self.init_k)

    def extra_repr(self) -> str:
        return f"learnable_concat={self.learnable_concat}, lip_coeff={self.lip_coeff}"


def dense_layers(width: int, depth: int, growth: int, act: str, make_linear: Callable[[int, int], nn.Module],
                 batchnorm: bool = False, learnable_concat: bool = True, lip_coeff: float = 0.98) -> Tuple[List[nn.Module], int]:
    """``depth`` dense layers on ``width`` input features; returns them and the final width (``width + depth * growth``).

    ``make_linear(n_in, n_out)`` builds the normalised conv / linear of each layer. An activation that
    concatenates (CLipSwish doubles the features) gets a layer with ``growth / 2`` outputs.
    """
    layers: List[nn.Module] = []
    for _ in range(depth):
        activation = make_activation(act)
        mult = getattr(activation, "out_multiplier", 1)
        if growth % mult:
            raise ValueError(f"growth {growth} must be divisible by {mult} for this activation")
        net = [make_linear(width, growth // mult)]
        if batchnorm:
            net.append(MovingBatchNorm2d(growth // mult))
        net.append(activation)
        layers.append(LipschitzDenseLayer(nn.Sequential(*net), learnable_concat, lip_coeff))
        width += growth
    return layers, width


def dense_conv_layers(channels: int, depth: int, growth: int, act: str, make_conv: Callable[[int, int, int], nn.Module],
                      batchnorm: bool = False, learnable_concat: bool = True, lip_coeff: float = 0.98) -> nn.Sequential:
    """Convolutional dense branch: ``depth`` dense layers with 3x3 convs, then a 1x1 conv back to ``channels``.
    ``make_conv(n_in, n_out, kernel_size)`` builds a normalised convolution (stride 1, same padding)."""
    layers, width = dense_layers(channels, depth, growth, act, lambda i, o: make_conv(i, o, 3), batchnorm,
                                 learnable_concat, lip_coeff)
    return nn.Sequential(*layers, make_conv(width, channels, 1))


def dense_fc_layers(dim: int, depth: int, growth: int, act: str, make_linear: Callable[[int, int], nn.Module],
                    learnable_concat: bool = True, lip_coeff: float = 0.98, hidden: int = FC_DENSE_HIDDEN) -> nn.Sequential:
    """Fully connected dense branch on ``dim`` features: linear ``dim -> hidden``, ``depth`` dense layers,
    linear back to ``dim``."""
    layers, width = dense_layers(hidden, depth, growth, act, make_linear, False, learnable_concat, lip_coeff)
    return nn.Sequential(make_linear(dim, hidden), *layers, make_linear(width, dim))


# ------------------------------------------------------------------------------------------------
# Linearisation (the fast path of resflows.layers.linearize): y = concat(eta1 x, eta2 net(x)), so
# w^T J = eta1 w_x + eta2 (w_net^T J_net) and J t = concat(eta1 t, eta2 J_net t). The inner network has its
# own (nested) tape.
# ------------------------------------------------------------------------------------------------
def _dense_primal(m: LipschitzDenseLayer, x: Tensor):
    eta1, eta2 = m.etas()
    y, sub = linearize.primal(m.network, x)
    return torch.cat([eta1 * x, eta2 * y], 1), (eta1, eta2, x.shape[1], sub)


def _dense_vjp(data, w: Tensor, inplace: bool) -> Tensor:
    eta1, eta2, c, sub = data
    return eta1 * w[:, :c] + eta2 * linearize.tape_vjp(sub, w[:, c:])


def _dense_dual(m: LipschitzDenseLayer, x: Tensor, t: Tensor, data):
    eta1, eta2 = m.etas()  # with a graph: K receives gradients
    y, ty = linearize.dual(m.network, x, t, data[3])
    return torch.cat([eta1 * x, eta2 * y], 1), torch.cat([eta1 * t, eta2 * ty], 1)


linearize.register(LipschitzDenseLayer, linearize.Handler(
    _dense_primal, _dense_vjp, _dense_dual,
    keep=lambda data: (None, None, data[2], linearize.strip_tape(data[3])),
    ok=lambda m: linearize.supports(m.network),
))
