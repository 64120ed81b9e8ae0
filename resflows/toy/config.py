"""Typed configuration of ``train_toy.py`` (SPEC section 2): the paper's flags, same names and defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, Range, check_fields, flag_name, format_vnorms, parse_int_tuple, parse_vnorms
from .data import DATASETS

__all__ = ["ToyConfig", "TOY_ACTIVATIONS"]

# The paper's toy `--act` choices (all in resflows.layers.ACTIVATIONS).
TOY_ACTIVATIONS = ("relu", "tanh", "elu", "selu", "fullsort", "maxmin", "swish", "lcube")


@dataclass
class ToyConfig:
    """Every ``train_toy.py`` flag, typed. Field names are the paper's argparse destinations."""

    data: str = "pinwheel"
    arch: str = "iresnet"
    coeff: float = 0.9
    vnorms: Tuple[float, ...] = (2.0,) * 6
    n_lipschitz_iters: Optional[int] = 5
    atol: Optional[float] = None
    rtol: Optional[float] = None
    learn_p: bool = False
    mixed: bool = True
    dims: Tuple[int, ...] = (128, 128, 128, 128)
    act: str = "swish"
    nblocks: int = 100
    brute_force: bool = False
    actnorm: bool = False
    batchnorm: bool = False
    exact_trace: bool = False
    n_power_series: Optional[int] = None
    n_samples: int = 1
    n_dist: str = "geometric"
    niters: int = 50000
    batch_size: int = 500
    test_batch_size: int = 10000
    lr: float = 1e-3
    weight_decay: float = 1e-5
    annealing_iters: int = 0
    save: str = "experiments/iresnet_toy"
    viz_freq: int = 100
    val_freq: int = 100
    log_freq: int = 10
    gpu: int = 0
    seed: int = 0
    # Ours: figure resolution (grid side and histogram bins) and number of model samples (None: npts^2,
    # as the paper). Lower them on a CPU: every sample goes through the fixed-point inverse of every block.
    viz_npts: int = 400
    viz_samples: Optional[int] = None

    def __post_init__(self) -> None:
        self.dims = parse_int_tuple(self.dims, "--dims")
        self.vnorms = parse_vnorms(self.vnorms)
        self.validate()

    # The optimiser settings in the names resflows.trainer.make_optimizer reads (the paper's toy
    # script used Adam with --weight-decay).
    @property
    def optimizer(self) -> str:
        return "adam"

    @property
    def wd(self) -> float:
        return self.weight_decay

    @property
    def n_linear(self) -> int:
        """Linear layers per residual / coupling net: 2 -> dims[0] -> ... -> dims[-1] -> 2."""
        return len(self.dims) + 1

    def lipschitz_kwargs(self) -> Dict[str, Any]:
        """Arguments of the power-iteration update after each step: ``--n-lipschitz-iters`` if set, else
        iterate to ``--atol`` / ``--rtol`` (1e-3 when neither is given)."""
        if self.n_lipschitz_iters is not None:
            return dict(n_iterations=self.n_lipschitz_iters, atol=None, rtol=None)
        if self.atol is None and self.rtol is None:
            return dict(n_iterations=None, atol=1e-3, rtol=1e-3)
        return dict(n_iterations=None, atol=self.atol, rtol=self.rtol)

    def validate(self) -> None:
        check_fields(self, TOY_RULES, _toy_flag)
        if self.data not in DATASETS:
            raise ConfigError(f"--data must be one of {', '.join(DATASETS)}; got {self.data!r}")
        if self.arch not in ("iresnet", "realnvp"):
            raise ConfigError(f"--arch must be iresnet or realnvp; got {self.arch!r}")
        if self.act not in TOY_ACTIVATIONS:
            raise ConfigError(f"--act must be one of {', '.join(TOY_ACTIVATIONS)}; got {self.act!r}")
        if self.act == "maxmin" and any(d % 2 for d in self.dims):
            raise ConfigError(f"--act maxmin pairs up features, so every --dims entry must be even; got {'-'.join(map(str, self.dims))}")
        if self.n_dist not in ("poisson", "geometric"):
            raise ConfigError(f"--n-dist must be poisson or geometric; got {self.n_dist!r}")
        if self.arch == "iresnet":
            if not 0 < self.coeff < 1:
                raise ConfigError(f"--coeff must be in (0, 1) so that every residual block is invertible; got {self.coeff}")
            if len(self.vnorms) < self.n_linear + 1:
                raise ConfigError(
                    f"--vnorms needs one order per linear layer plus one: --dims {'-'.join(map(str, self.dims))} makes "
                    f"{self.n_linear} linear layers per block, so give {self.n_linear + 1} orders "
                    f"(e.g. {'2' * (self.n_linear + 1)}); got {format_vnorms(self.vnorms)}"
                )
        if not self.save:
            raise ConfigError("--save is empty; give an output folder, e.g. --save experiments/toy")

    @property
    def orders(self) -> Tuple[float, ...]:
        """The norm orders p_0..p_L used along each residual net (a longer --vnorms is cut, as the paper's zip)."""
        return tuple(self.vnorms[: self.n_linear + 1])

    # -- (de)serialisation: plain types only, so checkpoints load with weights_only=True ----------
    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in dataclasses.fields(self)
                for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ToyConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Ranges of every numeric flag (the same mechanism as train_img.py's; --coeff is checked in validate, since
# only the residual architecture needs it below 1; --vnorms by parse_vnorms).
TOY_RULES: Dict[str, Range] = {
    "n_lipschitz_iters": POSITIVE, "atol": Range(0, lo_open=True), "rtol": Range(0, lo_open=True), "dims": POSITIVE,
    "nblocks": POSITIVE, "n_power_series": POSITIVE, "n_samples": POSITIVE, "niters": POSITIVE, "batch_size": POSITIVE,
    "test_batch_size": POSITIVE, "lr": Range(0, 10, lo_open=True, why="larger steps overflow the optimiser"),
    "weight_decay": NON_NEGATIVE, "annealing_iters": NON_NEGATIVE, "viz_freq": POSITIVE, "val_freq": POSITIVE,
    "log_freq": POSITIVE, "gpu": NON_NEGATIVE, "seed": Range(0, 2**32 - 1), "viz_npts": POSITIVE, "viz_samples": POSITIVE,
    "coeff": Range(),
}

# The paper's toy flags spelled with underscores.
_UNDERSCORE_FLAGS = ("batch_size", "test_batch_size", "viz_freq", "val_freq", "log_freq", "viz_npts", "viz_samples")


def _toy_flag(name: str) -> str:
    return f"--{name}" if name in _UNDERSCORE_FLAGS else flag_name(name)
