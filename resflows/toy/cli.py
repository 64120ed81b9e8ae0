"""The ``train_toy.py`` command line: the paper's toy script's flag names and defaults, parsed once into
a :class:`ToyConfig`."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..flags import ConfigError, OneLineArgumentParser, add_flags
from .config import ToyConfig

__all__ = ["build_parser", "parse_args"]


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
        return ToyConfig(**vars(args))
    except ConfigError as e:  # a value out of range: one line and status 2, like any other bad flag
        parser.error(str(e))
