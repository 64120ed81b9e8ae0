"""The 2-D models of ``train_toy.py``: a chain of residual blocks (``--arch iresnet``) or of affine
coupling blocks (``--arch realnvp``), as a :class:`ToyFlow` (a ``SequentialFlow`` that owns its
Lipschitz maintenance). Module names follow the paper's toy script (``chain.<i>.nnet.<j>.weight``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import (
    ActNorm1d,
    CouplingBlock,
    MovingBatchNorm1d,
    SequentialFlow,
    get_linear,
    iResBlock,
    make_activation,
)
from ..layers.base import FlowLayer, zeros_logdet
from ..layers.monotone import MonotoneBlock
from ..layers.power import TOY_TOLERANCE
from ..layers.upkeep import FlowUpkeep
from .config import ToyConfig

__all__ = ["ToyFlow", "MovingBatchNormFlow1d", "build_toy_model", "residual_net", "coupling_net"]


class MovingBatchNormFlow1d(FlowLayer, MovingBatchNorm1d):
    """The mean-only moving batch norm as a flow layer between blocks (``--batchnorm``, as the paper's toy):
    a shift by the running mean, so its log-det is 0. Same state_dict keys as ``MovingBatchNorm1d``."""

    def forward(self, x):
        return MovingBatchNorm1d.forward(self, x), zeros_logdet(x)

    def inverse(self, y):
        return MovingBatchNorm1d.invert(self, y), zeros_logdet(y)

    def transform(self, x):
        return MovingBatchNorm1d.forward(self, x)

    def invert(self, y):
        return MovingBatchNorm1d.invert(self, y)


class ToyFlow(FlowUpkeep, SequentialFlow):
    """A flow on ``[B, 2]`` points (data -> latent) with its maintenance methods."""

    def __init__(self, layers: Sequence[nn.Module], lipschitz_kwargs: Optional[Dict] = None):
        super().__init__(layers)
        self.lipschitz_kwargs = dict(lipschitz_kwargs or dict(n_iterations=None, atol=TOY_TOLERANCE, rtol=TOY_TOLERANCE))

    def lipschitz_defaults(self) -> Dict:
        """The config's power-iteration settings (``ToyConfig.lipschitz_kwargs``)."""
        return self.lipschitz_kwargs


def _orders(cfg: ToyConfig) -> Tuple[list, list]:
    """Domain and codomain of each linear layer of one residual net.

    Fixed orders: layer i maps p_i -> p_{i+1} (``--vnorms``, also with ``--mixed False``, as the paper's toy
    script: ``--mixed`` only matters with ``--learn-p``). ``--learn-p``: learnable orders, one per position and shared cyclically
    (layer i maps p_i -> p_{i+1}, the last maps back to p_0, so the branch is contractive in the p_0 norm);
    with ``--mixed False`` a single learned order is shared by every layer, as in the paper's toy script.
    """
    n = cfg.n_linear
    if cfg.learn_p:
        if cfg.mixed:
            domains = [nn.Parameter(torch.tensor(0.0)) for _ in range(n)]
        else:
            domains = [nn.Parameter(torch.tensor(0.0))] * n
        return domains, domains[1:] + domains[:1]
    ps = list(cfg.orders)
    return ps[:-1], ps[1:]


def residual_net(cfg: ToyConfig) -> nn.Sequential:
    """``act, Linear(2, d1), act, ..., act, Linear(dk, 2)`` with Lipschitz-normalised linear layers, the last
    initialised near zero (the block starts near the identity)."""
    domains, codomains = _orders(cfg)
    sizes = (2,) + tuple(cfg.dims) + (2,)
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(make_activation(cfg.act))
        mult = getattr(layers[-1], "out_multiplier", 1)  # CPila doubles the features: hidden layers give half
        n_in = 2 * mult if i == 0 else n_in
        n_out = n_out if i == len(sizes) - 2 else n_out // mult
        layers.append(get_linear(n_in, n_out, coeff=cfg.coeff, domain=domains[i], codomain=codomains[i],
                                 zero_init=i == len(sizes) - 2))
    return nn.Sequential(*layers)


def coupling_net(cfg: ToyConfig) -> nn.Sequential:
    """MLP of a coupling block on 2-D data: x_a (1 value) -> (scale pre-activation, shift) of x_b, hidden sizes
    ``--dims``; the last layer starts at zero so each block starts as a fixed scaling sigmoid(2)."""
    sizes = (1,) + tuple(cfg.dims) + (2,)
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(make_activation(cfg.act))
        layers.append(nn.Linear(n_in, n_out))
    last = [m for m in layers if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


def build_toy_model(cfg: ToyConfig) -> ToyFlow:
    """The 2-D flow of ``train_toy.py``: ``[ActNorm] nblocks x (block [ActNorm] [MovingBatchNorm])``.

    iresnet: residual blocks with the estimator flags (the paper's toy used plain backprop through the
    series: no Neumann gradient, no backward-in-forward). realnvp: each of the ``nblocks`` steps is two
    coupling blocks, the second swapped, so both coordinates are transformed (the paper's code crashed here).
    ``--actnorm`` also puts an ActNorm before the first block, as the paper's toy script.
    """
    chain: List[nn.Module] = []
    if cfg.actnorm:
        chain.append(ActNorm1d(2))
    for _ in range(cfg.nblocks):
        if cfg.arch == "iresnet":
            block = MonotoneBlock if cfg.monotone_resolvent else iResBlock  # same arguments
            chain.append(block(
                residual_net(cfg),
                n_power_series=cfg.n_power_series,
                exact_trace=cfg.exact_trace,
                brute_force=cfg.brute_force,
                n_samples=cfg.n_samples,
                n_dist=cfg.n_dist,
                neumann_grad=False,
                grad_in_forward=False,
            ))
        else:
            chain.append(CouplingBlock(2, coupling_net(cfg), swap=False))
            chain.append(CouplingBlock(2, coupling_net(cfg), swap=True))
        if cfg.actnorm:
            chain.append(ActNorm1d(2))
        if cfg.batchnorm:
            chain.append(MovingBatchNormFlow1d(2))
    return ToyFlow(chain, cfg.lipschitz_kwargs())
