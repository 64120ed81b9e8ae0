"""Variational dequantisation (Ho et al. 2019, Flow++, Sec. 3.1) with invertible residual blocks.

Training a flow on discrete images through a continuous density needs noise ``u`` in each bin. Uniform
noise gives the bound ``log P(x) >= E_u log p(x + u)``; a learned noise distribution ``q(u | x)`` gives

    log P(x) >= E_{u ~ q} [log p(x + u) - log q(u | x)],

which is tight when ``q(u | x)`` equals the flow's density inside the bin (Flow++ eq. 12). Here
``q(u | x)`` is itself a flow: ``eps ~ N(0, I)`` shaped like ``x``, pushed through K blocks
``s <- s + g_k(s; x)``, then ``u = sigmoid(s)``. Each ``g_k`` is an i-DenseNet branch in ``s``
(Lipschitz < 1, so the block is invertible in ``s`` for every ``x``) whose dense layers receive an additive
injection computed from ``x`` by an unconstrained conditioning network:

    dense layer:  h -> concat(eta1 * h, eta2 * act(conv(h)) + inject(c_k(x)))

The injection does not depend on ``h``, so it adds nothing to the Jacobian in ``s`` and the Lipschitz
constant in ``s`` stays ``lip_coeff`` per layer. Then

    log q(u | x) = log N(eps) - sum_k log|det(I + dg_k/ds)| - sum_i log(sigmoid(s_i) (1 - sigmoid(s_i))),

per image, with each block's log-det estimated exactly as the main flow's (same estimator, same gradient
modes, the hand-written linearised path included).

Module names follow the Monotone Flows code (``dequantizer.nnet.{k}.nnet.0.nnet.0.weight``, ...), so its
dequantiser weights load unchanged.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import linearize
from .dense import LipschitzDenseLayer, dense_layers

Tensor = torch.Tensor

__all__ = ["Bottleneck", "ConditioningNet", "InjectedDenseLayer", "VarDeqWrapper", "ConditionedBranch",
           "VariationalDequantizer", "make_block"]

_LOG_2PI = math.log(2 * math.pi)


class Bottleneck(nn.Module):
    """``GN -> ReLU -> conv3x3(n_in, hidden) -> GN -> ReLU -> conv1x1 -> GN -> ReLU -> conv3x3(hidden, n_out)``
    plus a skip: the identity, or a 3x3 convolution ``match_channel`` (the injections, ``n_in -> growth``)."""

    def __init__(self, n_in: int, n_out: int, hidden: int, match_channel: bool = False):
        super().__init__()
        self.nnet = nn.Sequential(
            nn.GroupNorm(4, n_in), nn.ReLU(), nn.Conv2d(n_in, hidden, 3, 1, 1),
            nn.GroupNorm(32, hidden), nn.ReLU(), nn.Conv2d(hidden, hidden, 1, 1, 0),
            nn.GroupNorm(32, hidden), nn.ReLU(), nn.Conv2d(hidden, n_out, 3, 1, 1),
        )
        if not match_channel and n_in != n_out:
            raise ValueError(f"an identity skip needs n_in == n_out, got {n_in} -> {n_out}")
        self.match_channel = nn.Conv2d(n_in, n_out, 3, 1, 1) if match_channel else None

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.match_channel is None else self.match_channel(x)
        return self.nnet(x) + skip


class ConditioningNet(nn.Module):
    """``c_k(x)``: conv3x3(C, width) then ``n_blocks`` bottlenecks; no Lipschitz constraint (x is not inverted)."""

    def __init__(self, channels: int, width: int = 64, hidden: int = 512, n_blocks: int = 3):
        super().__init__()
        self.nnet = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), *[Bottleneck(width, width, hidden) for _ in range(n_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.nnet(x)


class InjectedDenseLayer(nn.Module):
    """A Lipschitz dense layer in ``h`` whose new channels receive ``inject_layer(c)``:
    ``concat(eta1 h, eta2 act(conv(h)) + inject(c))``."""

    def __init__(self, dense: LipschitzDenseLayer, inject: nn.Module):
        super().__init__()
        self.lipschitz_dense_layer = dense
        self.inject_layer = inject

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        eta1, eta2 = self.lipschitz_dense_layer.etas()
        return torch.cat([eta1 * h, eta2 * self.lipschitz_dense_layer.network(h) + self.inject_layer(c)], 1)


class VarDeqWrapper(nn.Module):
    """The last (normalised 1x1) convolution of a conditioned branch, under the name the reference code uses."""

    def __init__(self, nnet: nn.Module):
        super().__init__()
        self.nnet = nnet

    def forward(self, h: Tensor) -> Tensor:
        return self.nnet(h)


class ConditionedBranch(nn.ModuleList):
    """``g(s; x)``: ``[ConditioningNet, InjectedDenseLayer x depth, VarDeqWrapper]``.

    It is called like any residual branch, ``g(s)``: the image ``x`` it is conditioned on is set for the
    duration of a dequantiser pass by :meth:`VariationalDequantizer.conditioned`. Because ``x`` is a
    constant for the block (no gradient flows to the data), every estimator of :class:`iResBlock` applies
    unchanged, and the conditioning network's parameters receive gradients with the branch's.
    """

    def __init__(self, modules: List[nn.Module]):
        super().__init__(modules)
        self.condition: Optional[Tensor] = None

    def _condition(self) -> Tensor:
        if self.condition is None:
            raise RuntimeError("a dequantiser block was called outside VariationalDequantizer.conditioned(x)")
        return self.condition

    def forward(self, s: Tensor) -> Tensor:  # type: ignore[override]
        c = self[0](self._condition())
        h = s
        for layer in self[1:-1]:
            h = layer(h, c)
        return self[-1](h)


# Linearisation of the branch (resflows.layers.linearize): the injection is constant in s, so the tape holds
# each dense layer's (eta1, eta2, width, inner tape) and the products skip the conditioning network; the
# conditioned image is kept so that the recomputation in the backward pass (dual) rebuilds c_k(x) with a graph.
def _branch_primal(m: ConditionedBranch, s: Tensor):
    x = m._condition()
    c = m[0](x)
    h, tapes = s, []
    for layer in m[1:-1]:
        dense = layer.lipschitz_dense_layer
        eta1, eta2 = dense.etas()
        y, sub = linearize.primal(dense.network, h)
        tapes.append((eta1, eta2, h.shape[1], sub))
        h = torch.cat([eta1 * h, eta2 * y + layer.inject_layer(c)], 1)
    out, last = linearize.primal(m[-1].nnet, h)
    return out, (x, tapes, last)


def _branch_vjp(data, w: Tensor, inplace: bool) -> Tensor:
    _, tapes, last = data
    w = linearize.tape_vjp(last, w, inplace)
    for eta1, eta2, width, sub in reversed(tapes):
        w = eta1 * w[:, :width] + eta2 * linearize.tape_vjp(sub, w[:, width:])
    return w


def _branch_dual(m: ConditionedBranch, s: Tensor, t: Tensor, data):
    x, tapes, last = data
    c = m[0](x)
    h = s
    for layer, (_, _, _, sub) in zip(m[1:-1], tapes):
        dense = layer.lipschitz_dense_layer
        eta1, eta2 = dense.etas()
        y, ty = linearize.dual(dense.network, h, t, sub)
        h, t = torch.cat([eta1 * h, eta2 * y + layer.inject_layer(c)], 1), torch.cat([eta1 * t, eta2 * ty], 1)
    return linearize.dual(m[-1].nnet, h, t, last)


linearize.register(ConditionedBranch, linearize.Handler(
    _branch_primal, _branch_vjp, _branch_dual,
    keep=lambda data: (data[0], [(None, None, w, linearize.strip_tape(sub)) for _, _, w, sub in data[1]],
                       linearize.strip_tape(data[2])),
    ok=lambda m: all(linearize.supports(layer.lipschitz_dense_layer.network) for layer in m[1:-1])
    and linearize.supports(m[-1].nnet),
))


def conditioned_branch(channels: int, depth: int, growth: int, act: str, make_conv: Callable[[int, int, int], nn.Module],
                       learnable_concat: bool = True, lip_coeff: float = 0.98, cond_width: int = 64,
                       cond_hidden: int = 512, cond_blocks: int = 3) -> ConditionedBranch:
    """``g(s; x)`` on ``channels``: ``depth`` dense layers of ``growth`` (3x3 convs built by ``make_conv(n_in,
    n_out, k)``, normalised), each with an injection from ``c(x)``, then a normalised 1x1 conv back."""
    layers, width = dense_layers(channels, depth, growth, act, lambda i, o: make_conv(i, o, 3), False, learnable_concat, lip_coeff)
    injected = [InjectedDenseLayer(d, Bottleneck(cond_width, growth, cond_hidden, match_channel=True)) for d in layers]
    return ConditionedBranch([ConditioningNet(channels, cond_width, cond_hidden, cond_blocks), *injected,
                              VarDeqWrapper(make_conv(width, channels, 1))])


def make_block(block_cls: type, nnet: nn.Module, **estimator: object) -> nn.Module:
    """One dequantiser block ``s + g(s; x)`` of class ``block_cls`` (``iResBlock`` or a block with its
    constructor), with the main flow's estimator settings."""
    return block_cls(nnet, **estimator)


class VariationalDequantizer(nn.Module):
    """``q(u | x)``: ``forward(x) -> (u, log q(u | x))``, ``u`` in (0, 1) shaped like ``x``, ``log q`` per image [B].

    ``x`` is the noise-free image (any fixed map of the levels); the caller places ``u`` in the bins.
    """

    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.nnet = nn.ModuleList(blocks)
        # Where eps comes from: torch.randn_like unless a function x -> eps is set (tests, fixed noise).
        self.noise_fn: Optional[Callable[[Tensor], Tensor]] = None

    @contextlib.contextmanager
    def conditioned(self, x: Tensor) -> Iterator[None]:
        """Every block's branch sees ``x`` as its condition inside the ``with``."""
        branches = [b.nnet for b in self.nnet]
        for br in branches:
            br.condition = x
        try:
            yield
        finally:
            for br in branches:
                br.condition = None

    def flow(self, eps: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``s = T_K(...T_1(eps; x))`` and ``sum_k log|det dT_k/ds|`` [B]."""
        logdet = eps.new_zeros(eps.shape[0])
        s = eps
        with self.conditioned(x):
            for block in self.nnet:
                s, ld = block(s)
                logdet = logdet + ld
        return s, logdet

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        eps = self.noise_fn(x) if self.noise_fn is not None else torch.randn_like(x)
        s, logdet = self.flow(eps, x)
        log_normal = (-0.5 * (_LOG_2PI + eps * eps)).reshape(eps.shape[0], -1).sum(1)
        # log sigmoid'(s) = log sigmoid(s) + log sigmoid(-s), stable for large |s|.
        log_squash = (F.logsigmoid(s) + F.logsigmoid(-s)).reshape(s.shape[0], -1).sum(1)
        return torch.sigmoid(s), log_normal - logdet - log_squash
