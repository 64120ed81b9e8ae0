"""Typed configuration of ``train_toy.py``: the paper's toy script's flags, same names and defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..config import format_vnorms, parse_act, parse_int_tuple, parse_vnorms
from ..flags import NON_NEGATIVE, POSITIVE, ConfigError, Range, check_fields, flag, rules_of
from ..layers.activations import activation_choices
from ..layers.power import TOY_TOLERANCE
from .data import DATASETS

__all__ = ["ToyConfig", "TOY_ACTIVATIONS", "TOY_RULES"]

# The paper's toy `--act` choices (resflows.layers.activations.ACTIVATION_SCRIPTS).
# CPila (Monotone Flows' spelling accepted) doubles the features: each hidden linear layer gives half of --dims.
TOY_ACTIVATIONS = activation_choices("toy")


@dataclass
class ToyConfig:
    """Every ``train_toy.py`` flag, typed. Field names are the paper's argparse destinations."""

    data: str = flag("pinwheel", "toy density (fresh samples every batch)", choices=tuple(DATASETS))
    arch: str = flag("iresnet", choices=("iresnet", "realnvp"))
    # Checked in validate (below 1 only for the residual architecture); here only finite.
    coeff: float = flag(0.9, "Lipschitz target of every normalised linear layer", range=Range())
    # Orders 1..9 or infinity, checked by parse_vnorms.
    vnorms: Tuple[float, ...] = flag((2.0,) * 6, "norm orders p0..pL along each residual net (f = inf); len(dims) + 2 orders "
                                     "(extra ones are ignored)")
    n_lipschitz_iters: Optional[int] = flag(5, "power iterations per step; None = to --atol/--rtol", range=POSITIVE)
    atol: Optional[float] = flag(None, f"power-iteration tolerance when --n-lipschitz-iters None (default {TOY_TOLERANCE:g})",
                                 range=Range(0, lo_open=True))
    rtol: Optional[float] = flag(None, f"power-iteration tolerance when --n-lipschitz-iters None (default {TOY_TOLERANCE:g})",
                                 range=Range(0, lo_open=True))
    learn_p: bool = flag(False, "learn the norm orders")
    mixed: bool = flag(True, "with --learn-p: one learned order per position (True) or one shared by every layer (False)")
    dims: Tuple[int, ...] = flag((128, 128, 128, 128), "hidden widths of each residual / coupling net", range=POSITIVE)
    act: str = flag("swish", "swish means LipSwish; CPila is accepted", type=parse_act, choices=TOY_ACTIVATIONS)
    nblocks: int = flag(100, range=POSITIVE)
    brute_force: bool = flag(False, "exact log-det in training too")
    actnorm: bool = flag(False)
    batchnorm: bool = flag(False, "mean-only moving batch norm after each block")
    exact_trace: bool = flag(False, "power series with exact traces of J^k")
    monotone_resolvent: bool = flag(False, "monotone (Cayley) blocks instead of residual blocks (Monotone Flows)",
                                    name="--monotone_resolvent")
    n_power_series: Optional[int] = flag(None, "None = unbiased Russian roulette; int = truncated series", range=POSITIVE)
    n_samples: int = flag(1, "draws of the series length N", range=POSITIVE)
    n_dist: str = flag("geometric", choices=("geometric", "poisson"))
    niters: int = flag(50000, range=POSITIVE)
    # The paper's toy script spells these flags with underscores.
    batch_size: int = flag(500, name="--batch_size", range=POSITIVE)
    test_batch_size: int = flag(10000, "size of the fixed test set", name="--test_batch_size", range=POSITIVE)
    lr: float = flag(1e-3, range=Range(0, 10, lo_open=True, why="larger steps overflow the optimiser"))
    weight_decay: float = flag(1e-5, "decoupled weight decay (AdamW)", range=NON_NEGATIVE)
    annealing_iters: int = flag(0, "anneal the log-det weight to 1 over this many iterations", range=NON_NEGATIVE)
    save: str = flag("experiments/iresnet_toy", "output folder")
    viz_freq: int = flag(100, "write SAVE/figs/ITER.png every N iterations (and at iteration 1)", name="--viz_freq",
                         range=POSITIVE)
    val_freq: int = flag(100, name="--val_freq", range=POSITIVE)
    log_freq: int = flag(10, name="--log_freq", range=POSITIVE)
    gpu: int = flag(0, "use cuda:GPU when CUDA is available, else the CPU", range=NON_NEGATIVE)
    seed: int = flag(0, range=Range(0, 2**32 - 1))
    # Ours: the training step's precision, as train_img.py's --precision; the test loss and figures are float32
    precision: str = flag("fp32", "training precision: fp32, tf32 (TF32 matmuls on GPUs) or bf16 (the residual nets' "
                          "linear layers in bfloat16); evaluation is float32", choices=("fp32", "tf32", "bf16"))
    # Ours: figure resolution (grid side and histogram bins) and number of model samples (None: npts^2,
    # as the paper). Lower them on a CPU: every sample goes through the fixed-point inverse of every block.
    viz_npts: int = flag(400, "grid side of the density panel and bins of the histograms", name="--viz_npts", range=POSITIVE)
    viz_samples: Optional[int] = flag(None, "model samples in the figure (None: viz_npts^2)", name="--viz_samples",
                                      range=POSITIVE)

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
        iterate to ``--atol`` / ``--rtol`` (:data:`~resflows.layers.power.TOY_TOLERANCE` when neither is given)."""
        if self.n_lipschitz_iters is not None:
            return dict(n_iterations=self.n_lipschitz_iters, atol=None, rtol=None)
        if self.atol is None and self.rtol is None:
            return dict(n_iterations=None, atol=TOY_TOLERANCE, rtol=TOY_TOLERANCE)
        return dict(n_iterations=None, atol=self.atol, rtol=self.rtol)

    def validate(self) -> None:
        check_fields(self)
        if self.data not in DATASETS:
            raise ConfigError(f"--data must be one of {', '.join(DATASETS)}; got {self.data!r}")
        if self.arch not in ("iresnet", "realnvp"):
            raise ConfigError(f"--arch must be iresnet or realnvp; got {self.arch!r}")
        if self.act not in TOY_ACTIVATIONS:
            raise ConfigError(f"--act must be one of {', '.join(TOY_ACTIVATIONS)}; got {self.act!r}")
        if self.monotone_resolvent and self.arch != "iresnet":
            raise ConfigError("--monotone_resolvent True turns residual blocks into monotone blocks; use --arch iresnet")
        if self.act in ("maxmin", "cpila") and any(d % 2 for d in self.dims):
            raise ConfigError(f"--act {self.act} pairs up features, so every --dims entry must be even; "
                              f"got {'-'.join(map(str, self.dims))}")
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


# The range table, derived from the fields (a test checks that every numeric field has one).
TOY_RULES: Dict[str, Range] = rules_of(ToyConfig)
