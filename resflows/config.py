"""Typed configuration. Strings from the command line (``"16-16-16"``, ``"3-1-3"``, ``"2222"``) are
parsed here, once; layers and models only see ints, floats and tuples."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .layers.activations import ACTIVATION_ALIASES

__all__ = [
    "ConfigError",
    "Range",
    "check_fields",
    "flag_name",
    "TRAIN_RULES",
    "MODEL_RULES",
    "ModelConfig",
    "parse_bool",
    "parse_int_tuple",
    "parse_vnorms",
    "format_vnorms",
]

INF = float("inf")


class ConfigError(ValueError):
    """A bad flag value or combination; the message names the flag and what to do."""


# ------------------------------------------------------------------------------------------------
# One set of rules for every number a run takes: checked the same way for the flags typed on a command
# line and for the config stored in a checkpoint (which a crafted or damaged file may fill with anything).
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: finite, between ``lo`` and ``hi`` (open or closed ends)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # appended to the message: what the bound protects

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        lo, hi = self.lo, self.hi
        if math.isinf(lo) and math.isinf(hi):
            return kind
        if math.isinf(hi):
            return f"{kind} {'>' if self.lo_open else '>='} {lo:g}"
        if math.isinf(lo):
            return f"{kind} {'<' if self.hi_open else '<='} {hi:g}"
        return f"{kind} in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(1)  # integers >= 1
NON_NEGATIVE = Range(0)


def flag_name(field_name: str) -> str:
    """``n_power_series`` -> ``--n-power-series`` (the toy script keeps the paper's underscores in a few flags)."""
    return "--" + field_name.replace("_", "-")


def _check_type(value: Any, hint: Any, flag: str) -> Any:
    """``value`` as the annotated type (bool, int, float, str, Optional[...], tuples), or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], flag) if len(inner) == 1 else value
    if hint is bool:
        try:
            return parse_bool(value) if isinstance(value, (bool, str)) else _fail(flag, "True or False", value)
        except ValueError:
            _fail(flag, "True or False", value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(flag, "an integer", value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(flag, "a number", value)
    if hint is str:
        if isinstance(value, str):
            return value
        _fail(flag, "a string", value)
    if origin in (tuple, Tuple):
        if isinstance(value, (tuple, list, str)):
            return value  # parsed (and its items checked) by the owner's __post_init__
        _fail(flag, "a list", value)
    return value


def _fail(flag: str, what: str, value: Any):
    shown = repr(value) if not isinstance(value, (dict, list, tuple)) or len(repr(value)) < 60 else type(value).__name__
    raise ConfigError(f"{flag} must be {what}, got {shown}")


def check_fields(obj: Any, rules: Dict[str, Range], flag=flag_name) -> None:
    """Check every field of the dataclass ``obj`` against its annotated type (coercing ``1`` -> ``1.0`` for
    floats, ``"true"`` -> ``True`` for bools) and every numeric field against ``rules``; raises
    :class:`ConfigError` naming the flag, the allowed values and the value found."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name = flag(f.name)
        v = _check_type(getattr(obj, f.name), hints.get(f.name, Any), name)
        object.__setattr__(obj, f.name, v)
        rule = rules.get(f.name)
        if rule is None or v is None:
            continue
        values = v if isinstance(v, (tuple, list)) else [v]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not rule.contains(item):
                why = f" ({rule.why})" if rule.why else ""
                raise ConfigError(f"{name} must be {rule.describe(_is_int(hints.get(f.name)))}{why}, got {_show(v)}")


def _is_int(hint: Any) -> bool:
    return hint is int or int in typing.get_args(hint)


def _show(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "-".join(map(str, v)) if len(v) < 20 else f"{len(v)} values"
    return repr(v) if isinstance(v, str) else f"{v}"


def parse_bool(value: Any) -> bool:
    """Strict boolean: True/False/true/false/1/0 (never ``eval``)."""
    if isinstance(value, bool):
        return value
    s = str(value).strip()
    if s in ("True", "true", "1"):
        return True
    if s in ("False", "false", "0"):
        return False
    raise ValueError(f"expected True or False (or true/false/1/0), got {value!r}")


def parse_int_tuple(value: Any, flag: str) -> Tuple[int, ...]:
    """``"16-16-16"`` -> ``(16, 16, 16)``; positive integers joined by '-'."""
    if isinstance(value, (tuple, list)):
        items = list(value)
    else:
        items = str(value).strip().split("-")
    try:
        out = tuple(int(i) for i in items)
    except ValueError:
        raise ConfigError(f"{flag} must be positive integers joined by '-', like 16-16-16; got {value!r}") from None
    if not out or any(i <= 0 for i in out):
        raise ConfigError(f"{flag} must be positive integers joined by '-', like 16-16-16; got {value!r}")
    return out


def parse_vnorms(value: Any) -> Tuple[float, ...]:
    """``"222f"`` -> ``(2., 2., 2., inf)``: one norm order per character, ``f`` = infinity."""
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    s = str(value).strip()
    out = []
    for ch in s:
        if ch == "f":
            out.append(INF)
        elif ch.isdigit() and int(ch) >= 1:
            out.append(float(ch))
        else:
            raise ConfigError(f"--vnorms takes one norm order per character (digits 1-9, or f for infinity), like 2222; got {value!r}")
    if len(out) < 2:
        raise ConfigError(f"--vnorms needs at least two orders (one more than the number of kernels); got {value!r}")
    return tuple(out)


def format_vnorms(vnorms: Tuple[float, ...]) -> str:
    return "".join("f" if v == INF else str(int(v)) for v in vnorms)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`resflows.ResidualFlow`.

    ``input_size`` is the (C, H, W) the data pipeline hands the model: image channels plus
    ``--padding`` channels, before ``squeeze_first`` (which the model applies itself).
    """

    input_size: Tuple[int, int, int] = (3, 32, 32)
    nblocks: Tuple[int, ...] = (16, 16, 16)
    block: str = "resblock"
    idim: int = 512
    squeeze_first: bool = False
    factor_out: bool = False
    quadratic: bool = False
    init_layer: Optional[str] = "logit"  # 'logit', 'normalize' or None
    logit_alpha: float = 0.05
    normalize_mean: Tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    normalize_std: Tuple[float, ...] = (0.2023, 0.1994, 0.2010)
    actnorm: bool = True
    fc_actnorm: bool = False
    batchnorm: bool = False
    dropout: float = 0.0
    fc: bool = False
    coeff: float = 0.98
    vnorms: Tuple[float, ...] = (2.0, 2.0, 2.0, 2.0)
    n_lipschitz_iters: Optional[int] = None
    sn_tol: float = 1e-3
    learn_p: bool = False
    n_power_series: Optional[int] = None
    n_dist: str = "poisson"
    n_samples: int = 1
    n_exact_terms: int = 2
    neumann_grad: bool = True
    mem_eff: bool = True
    act: str = "swish"
    kernels: Tuple[int, ...] = (3, 1, 3)
    fc_end: bool = True
    fc_nblocks: int = 4
    fc_idim: int = 128
    preact: bool = True
    first_resblock: bool = True
    classification: bool = False
    n_classes: int = 10
    cdim: int = 256
    # i-DenseNets (Perugachi-Diaz et al. 2021): dense residual branches, see resflows/layers/dense.py.
    densenet: bool = False
    densenet_depth: int = 3
    densenet_growth: int = 172
    fc_densenet_growth: int = 32
    learnable_concat: bool = True
    lip_coeff: float = 0.98

    # Names of the fields that fix the architecture (state_dict keys and shapes). n_samples sizes only the
    # last_n_samples record, which a resume with another --n-samples rebuilds (as the paper's code does).
    ARCH_FIELDS = (
        "input_size", "nblocks", "block", "idim", "squeeze_first", "factor_out", "quadratic", "init_layer",
        "actnorm", "fc_actnorm", "batchnorm", "fc", "vnorms", "learn_p", "act", "kernels",
        "fc_end", "fc_nblocks", "fc_idim", "preact", "first_resblock", "classification", "n_classes", "cdim",
        "densenet", "densenet_depth", "densenet_growth", "fc_densenet_growth", "learnable_concat",
    )

    def __post_init__(self) -> None:
        self.input_size = tuple(int(i) for i in self.input_size)  # type: ignore[assignment]
        self.nblocks = parse_int_tuple(self.nblocks, "--nblocks")
        self.kernels = parse_int_tuple(self.kernels, "--kernels")
        self.vnorms = parse_vnorms(self.vnorms)
        self.normalize_mean = tuple(float(m) for m in self.normalize_mean)
        self.normalize_std = tuple(float(s) for s in self.normalize_std)
        self.act = ACTIVATION_ALIASES.get(self.act, self.act)  # the fork's spellings (CLipSwish)
        self.validate()

    def validate(self) -> None:
        check_fields(self, MODEL_RULES)
        if len(self.input_size) != 3:
            raise ConfigError(f"input_size must be (channels, height, width), got {self.input_size}")
        if self.block not in ("resblock", "coupling"):
            raise ConfigError(f"--block must be resblock or coupling, got {self.block!r}")
        if self.block == "resblock" and not self.densenet and len(self.vnorms) != len(self.kernels) + 1:
            raise ConfigError(
                f"--vnorms needs one more order than --kernels has kernels: --kernels {'-'.join(map(str, self.kernels))} "
                f"has {len(self.kernels)}, so give {len(self.kernels) + 1} orders (e.g. {'2' * (len(self.kernels) + 1)}); "
                f"got {format_vnorms(self.vnorms)}"
            )
        if any(k % 2 == 0 for k in self.kernels):
            raise ConfigError(f"--kernels must be odd sizes (padding k//2 keeps the feature map), got {'-'.join(map(str, self.kernels))}")
        if self.n_dist not in ("poisson", "geometric"):
            raise ConfigError(f"--n-dist must be poisson or geometric, got {self.n_dist!r}")
        if self.init_layer not in ("logit", "normalize", None):
            raise ConfigError(f"unknown init layer {self.init_layer!r}")
        if self.densenet:
            self._validate_densenet()
        c, h, w = self.input_size
        if self.squeeze_first and (h % 2 or w % 2):
            raise ConfigError(f"--squeeze-first needs an even image size, got {h}x{w}")

    def _validate_densenet(self) -> None:
        if self.block != "resblock":
            raise ConfigError("--densenet True replaces the branches of residual blocks; drop --block coupling")
        if self.learn_p:
            raise ConfigError("--learn-p is not available with --densenet True (dense branches use the first --vnorms order); drop --learn-p")
        if self.dropout:
            raise ConfigError("--dropout is not used by dense branches; drop it with --densenet True")
        for flag, v in (("--densenet_depth", self.densenet_depth), ("--densenet_growth", self.densenet_growth),
                        ("--fc_densenet_growth", self.fc_densenet_growth)):
            if v < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {v}")
            if self.act == "clipswish" and v % 2 and flag != "--densenet_depth":
                raise ConfigError(f"{flag} must be even with --act CLipSwish (each conv gives half the channels, "
                                  f"the activation doubles them); got {v}")

    # -- (de)serialisation: plain types only, so checkpoints load with weights_only=True ----------
    def to_dict(self) -> Dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def architecture(self) -> Dict[str, Any]:
        """The fields that fix the state_dict layout."""
        d = self.to_dict()
        return {k: d[k] for k in self.ARCH_FIELDS}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class TrainConfig:
    """Every ``train_img.py`` flag (SPEC section 1) plus ours, typed. Field names are the paper's
    argparse destinations, so a paper checkpoint's ``args`` maps onto it directly."""

    data: str = "cifar10"
    dataroot: str = "data"
    imagesize: Optional[int] = None  # None: 32 (the paper's default) for every paper dataset, 8 for digits
    nbits: int = 8
    block: str = "resblock"
    coeff: float = 0.98
    vnorms: str = "2222"
    n_lipschitz_iters: Optional[int] = None
    sn_tol: float = 1e-3
    learn_p: bool = False
    n_power_series: Optional[int] = None
    factor_out: bool = False
    n_dist: str = "poisson"
    n_samples: int = 1
    n_exact_terms: int = 2
    var_reduc_lr: float = 0.0
    neumann_grad: bool = True
    mem_eff: bool = True
    act: str = "swish"
    idim: int = 512
    nblocks: str = "16-16-16"
    squeeze_first: bool = False
    actnorm: bool = True
    fc_actnorm: bool = False
    batchnorm: bool = False
    dropout: float = 0.0
    fc: bool = False
    kernels: str = "3-1-3"
    logit_transform: bool = True
    add_noise: bool = True
    dequant: str = "exact"  # ours: 'paper' reproduces the paper's overlapping 5-bit bins (--nbits < 8)
    quadratic: bool = False
    fc_end: bool = True
    fc_idim: int = 128
    preact: bool = True
    padding: int = 0
    padding_dist: str = "uniform"
    first_resblock: bool = True
    cdim: int = 256
    optimizer: str = "adam"
    scheduler: bool = False
    nepochs: int = 1000
    batchsize: int = 64
    lr: float = 1e-3
    wd: float = 0.0
    warmup_iters: int = 1000
    annealing_iters: int = 0
    save: str = "experiment1"
    val_batchsize: int = 200
    seed: Optional[int] = None
    ema_val: bool = True
    update_freq: int = 1
    task: str = "density"
    scale_dim: bool = False
    rcrop_pad_mode: str = "reflect"
    resume: Optional[str] = None
    begin_epoch: int = 0
    nworkers: int = 4
    print_freq: int = 20
    vis_freq: int = 500
    # The i-DenseNets fork's flags (its names; densenet off here so the paper's commands are unchanged).
    densenet: bool = False
    densenet_depth: int = 3
    densenet_growth: int = 172
    fc_densenet_growth: int = 32
    learnable_concat: bool = True
    start_learnable_concat: int = 25
    lip_coeff: float = 0.98
    # Ours.
    max_iters: Optional[int] = None
    evaluate: bool = False
    sample: int = 0
    temp: float = 1.0
    nrow: Optional[int] = None
    device: str = "auto"
    tf32: bool = False  # ours: TF32 convolutions / matmuls on GPUs that have them (the paper ran full float32)
    compile: bool = False
    inverse: str = "fixed-point"  # sampling: the paper's fixed-point iteration, or "anderson" (fewer evaluations)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Types and ranges of every field (:data:`TRAIN_RULES`) and the checks that involve two flags;
        raises :class:`ConfigError`. Choices of the string flags are checked by ``resflows.cli.validate_config``."""
        check_fields(self, TRAIN_RULES)
        if self.data == "digits" and self.imagesize is not None and self.imagesize % 8:
            raise ConfigError(f"--imagesize for digits must be a multiple of 8 (the images are 8x8), got {self.imagesize}")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_paper_args(cls, args: Dict[str, Any]) -> "TrainConfig":
        """Map the ``argparse.Namespace`` saved in a paper checkpoint (read as a dict) onto our config.
        Unknown keys are ignored; values keep their meaning (SPEC section 1)."""
        cfg = cls.from_dict({k: v for k, v in args.items() if not k.startswith("_")})
        cfg.act = ACTIVATION_ALIASES.get(cfg.act, cfg.act)  # the i-DenseNets fork saved --act CLipSwish
        # The paper stored booleans as bools (type=eval) and the numeric flags already typed.
        return cfg


# Ranges of every numeric field (a test checks that none is missing). Integers: POSITIVE (>= 1) or
# NON_NEGATIVE (>= 0); numbers are always finite.
_UNIT_OPEN = Range(0, 1, lo_open=True, hi_open=True)
_COEFF = Range(0, 1, lo_open=True, hi_open=True, why="a residual block is invertible only when its Lipschitz constant is below 1")
_DROPOUT = Range(0, 1, hi_open=True)
_TOL = Range(0, 1, lo_open=True)
_LIP_COEFF = Range(0, 1, lo_open=True, why="each dense layer's Lipschitz constant must stay at most 1")

TRAIN_RULES: Dict[str, Range] = {
    "imagesize": POSITIVE, "nbits": Range(1, 8, why="the images have 8 bits per channel"), "coeff": _COEFF,
    "n_lipschitz_iters": POSITIVE, "sn_tol": _TOL, "n_power_series": POSITIVE, "n_samples": POSITIVE,
    "n_exact_terms": NON_NEGATIVE, "var_reduc_lr": NON_NEGATIVE, "idim": POSITIVE, "dropout": _DROPOUT,
    "fc_idim": POSITIVE, "padding": NON_NEGATIVE, "cdim": POSITIVE, "nepochs": POSITIVE, "batchsize": POSITIVE,
    "lr": Range(0, 10, lo_open=True, why="larger steps overflow the optimiser"), "wd": NON_NEGATIVE,
    "warmup_iters": NON_NEGATIVE, "annealing_iters": NON_NEGATIVE, "val_batchsize": POSITIVE,
    "seed": Range(0, 2**32 - 1), "update_freq": POSITIVE, "begin_epoch": NON_NEGATIVE, "nworkers": NON_NEGATIVE,
    "print_freq": POSITIVE, "vis_freq": POSITIVE, "max_iters": POSITIVE, "sample": NON_NEGATIVE,
    "temp": Range(0, lo_open=True), "nrow": POSITIVE,
    "densenet_depth": POSITIVE, "densenet_growth": POSITIVE, "fc_densenet_growth": POSITIVE,
    "start_learnable_concat": NON_NEGATIVE, "lip_coeff": _LIP_COEFF,
}

MODEL_RULES: Dict[str, Range] = {
    "input_size": POSITIVE, "nblocks": POSITIVE, "idim": POSITIVE, "logit_alpha": Range(0, 0.5, lo_open=True, hi_open=True),
    "normalize_mean": Range(), "normalize_std": Range(0, lo_open=True), "dropout": _DROPOUT, "coeff": _COEFF,
    "n_lipschitz_iters": POSITIVE, "sn_tol": _TOL, "n_power_series": POSITIVE, "n_samples": POSITIVE,
    "n_exact_terms": NON_NEGATIVE, "kernels": POSITIVE, "fc_nblocks": NON_NEGATIVE, "fc_idim": POSITIVE,
    "n_classes": POSITIVE, "cdim": POSITIVE,
    "densenet_depth": POSITIVE, "densenet_growth": POSITIVE, "fc_densenet_growth": POSITIVE, "lip_coeff": _LIP_COEFF,
}
