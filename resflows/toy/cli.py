"""The ``train_toy.py`` command line (SPEC section 2): the paper's flag names and defaults, parsed once into
a :class:`ToyConfig`."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import OneLineArgumentParser, _bool, _optional_float, _optional_int
from ..config import ConfigError, format_vnorms
from .config import TOY_ACTIVATIONS, ToyConfig
from .data import DATASETS

__all__ = ["build_parser", "parse_args"]


def build_parser(prog: str = "train_toy.py") -> argparse.ArgumentParser:
    d = ToyConfig()
    p = OneLineArgumentParser(prog=prog, description="Train a Residual Flow (or a RealNVP baseline) on a 2-D toy density "
                              "and draw data, model density and model samples every --viz_freq iterations.")
    a = p.add_argument
    a("--data", choices=list(DATASETS), default=d.data, help="toy density (fresh samples every batch)")
    a("--arch", choices=["iresnet", "realnvp"], default=d.arch)
    a("--coeff", type=float, default=d.coeff, help="Lipschitz target of every normalised linear layer")
    a("--vnorms", type=str, default=format_vnorms(d.vnorms),
      help="norm orders p0..pL along each residual net (f = inf); len(dims) + 2 orders (extra ones are ignored)")
    a("--n-lipschitz-iters", type=_optional_int, default=d.n_lipschitz_iters, help="power iterations per step; None = to --atol/--rtol")
    a("--atol", type=_optional_float, default=d.atol, help="power-iteration tolerance when --n-lipschitz-iters None (default 1e-3)")
    a("--rtol", type=_optional_float, default=d.rtol, help="power-iteration tolerance when --n-lipschitz-iters None (default 1e-3)")
    a("--learn-p", type=_bool, default=d.learn_p, help="learn the norm orders")
    a("--mixed", type=_bool, default=d.mixed,
      help="with --learn-p: one learned order per position (True) or one shared by every layer (False)")
    a("--dims", type=str, default="-".join(map(str, d.dims)), help="hidden widths of each residual / coupling net")
    a("--act", choices=list(TOY_ACTIVATIONS), default=d.act, help="swish means LipSwish")
    a("--nblocks", type=int, default=d.nblocks)
    a("--brute-force", type=_bool, default=d.brute_force, help="exact log-det in training too")
    a("--actnorm", type=_bool, default=d.actnorm)
    a("--batchnorm", type=_bool, default=d.batchnorm, help="mean-only moving batch norm after each block")
    a("--exact-trace", type=_bool, default=d.exact_trace, help="power series with exact traces of J^k")
    a("--n-power-series", type=_optional_int, default=d.n_power_series, help="None = unbiased Russian roulette; int = truncated series")
    a("--n-samples", type=int, default=d.n_samples, help="draws of the series length N")
    a("--n-dist", choices=["geometric", "poisson"], default=d.n_dist)
    a("--niters", type=int, default=d.niters)
    a("--batch_size", type=int, default=d.batch_size)
    a("--test_batch_size", type=int, default=d.test_batch_size, help="size of the fixed test set")
    a("--lr", type=float, default=d.lr)
    a("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay (AdamW)")
    a("--annealing-iters", type=int, default=d.annealing_iters, help="anneal the log-det weight to 1 over this many iterations")
    a("--save", type=str, default=d.save, help="output folder")
    a("--viz_freq", type=int, default=d.viz_freq, help="write SAVE/figs/ITER.png every N iterations (and at iteration 1)")
    a("--val_freq", type=int, default=d.val_freq)
    a("--log_freq", type=int, default=d.log_freq)
    a("--gpu", type=int, default=d.gpu, help="use cuda:GPU when CUDA is available, else the CPU")
    a("--seed", type=int, default=d.seed)
    # Ours.
    a("--viz_npts", type=int, default=d.viz_npts, help="grid side of the density panel and bins of the histograms")
    a("--viz_samples", type=_optional_int, default=d.viz_samples, help="model samples in the figure (None: viz_npts^2)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "train_toy.py") -> ToyConfig:
    """Command line -> :class:`ToyConfig` (raises ``ConfigError`` for bad values or combinations)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return ToyConfig(**vars(args))
    except ConfigError as e:  # a value out of range: one line and status 2, like any other bad flag
        parser.error(str(e))
