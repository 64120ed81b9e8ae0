"""The ``train_toy.py`` command line: the paper's toy script's flag names and defaults, parsed once into
a :class:`ToyConfig`."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..budget import check_toy_run
from ..flags import ConfigError, OneLineArgumentParser, add_flags
from .config import ToyConfig

__all__ = ["build_parser", "parse_args", "toy_device"]


def build_parser(prog: str = "train_toy.py", defaults: bool = True) -> argparse.ArgumentParser:
    """The ``train_toy.py`` parser: one flag per :class:`ToyConfig` field (see ``resflows/flags.py``)."""
    p = OneLineArgumentParser(prog=prog, description="Train a Residual Flow (or a RealNVP baseline) on a 2-D toy density "
                              "and draw data, model density and model samples every --viz_freq iterations.")
    return add_flags(p, ToyConfig, defaults)


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "train_toy.py") -> ToyConfig:
    """Command line -> :class:`ToyConfig` (raises ``ConfigError`` for bad values or combinations)."""
    parser = build_parser(prog, defaults=False)  # flags not typed: ToyConfig's defaults
    args = parser.parse_args(argv)
    try:
        cfg = ToyConfig(**vars(args))
        check_toy_run(cfg, toy_device(cfg.gpu))  # sizes that cannot fit: refused before anything is built
        return cfg
    except ConfigError as e:  # a value out of range: one line and status 2, like any other bad flag
        parser.error(str(e))


def toy_device(gpu: int):
    """cuda:GPU when CUDA is available (as the paper), else the CPU; ConfigError for a GPU that is not there."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if gpu >= torch.cuda.device_count():
        raise ConfigError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(f"cuda:{gpu}")
