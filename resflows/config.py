"""Typed configuration: the model's settings (:class:`ModelConfig`) and every ``train_img.py`` flag
(:class:`TrainConfig`), each declared once as a field with its flag (see :mod:`resflows.flags`). Strings
from the command line (``"16-16-16"``, ``"3-1-3"``, ``"2222"``) are parsed here, once; layers and models
only see ints, floats and tuples."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

from .datasets import DATASETS
from .flags import (
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Range,
    check_choices,
    check_fields,
    flag,
    flag_name,
    names_where,
    nonnegative_int,
    parse_bool,
    positive_int,
    rules_of,
    same_flag,
)
from .layers.activations import ACTIVATION_ALIASES, activation_choices

__all__ = [
    "ConfigError",
    "Range",
    "check_fields",
    "flag_name",
    "TRAIN_RULES",
    "MODEL_RULES",
    "ModelConfig",
    "TrainConfig",
    "parse_act",
    "n_scales",
    "check_scales",
    "parse_bool",
    "parse_int_tuple",
    "parse_vnorms",
    "format_vnorms",
    "validate_config",
]

INF = float("inf")


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


def n_scales(h: int, w: int) -> int:
    """Number of halvings while both H and W stay >= 4 (the paper's _calc_n_scale)."""
    n = 0
    while h >= 4 and w >= 4:
        n += 1
        h, w = h // 2, w // 2
    return n


def check_scales(cfg: "ModelConfig") -> None:
    """``--nblocks`` has no more scales than the model input allows, and every scale but the last can be
    squeezed (even feature map): flag-only rules, so they are checked when parsing (and for a checkpoint's flags)."""
    c, h, w = cfg.input_size
    if cfg.squeeze_first:
        h, w = h // 2, w // 2
    possible = n_scales(h, w)
    if len(cfg.nblocks) > possible:
        raise ConfigError(
            f"--nblocks {'-'.join(map(str, cfg.nblocks))} asks for {len(cfg.nblocks)} scales, but a {h}x{w} model input "
            f"allows at most {possible} (each scale halves H and W, which must stay >= 4); "
            f"use fewer entries in --nblocks or a larger --imagesize"
        )
    for i in range(len(cfg.nblocks) - 1):
        if h % 2 or w % 2:
            raise ConfigError(
                f"scale {i} has a {h}x{w} feature map, which cannot be squeezed (odd size); "
                f"choose an --imagesize that halves evenly {len(cfg.nblocks) - 1} times, or fewer --nblocks entries"
            )
        h, w = h // 2, w // 2


def check_monotone(cfg: Any) -> None:
    """The flags ``--monotone_resolvent True`` cannot be combined with (a ModelConfig or a TrainConfig: same names)."""
    if not cfg.monotone_resolvent:
        return
    if cfg.block != "resblock":
        raise ConfigError("--monotone_resolvent True turns residual blocks into monotone blocks; drop --block coupling")
    # The solves evaluate the branch many times per sample: it must be the same deterministic map each time.
    for name, on in (("--batchnorm", cfg.batchnorm), ("--dropout", cfg.dropout)):
        if on:
            raise ConfigError(f"{name} is not available with --monotone_resolvent True (the solves need a fixed branch); "
                              f"drop {name}")


def parse_act(s: str) -> str:
    """``--act``: the i-DenseNets fork's spellings (CLipSwish, LeakyLSwish) as ours."""
    return ACTIVATION_ALIASES.get(s, s)


def check_var_deq(cfg: Any) -> None:
    """The --var-deq settings of a ModelConfig or TrainConfig (the same field names); raises ConfigError."""
    if cfg.var_deq_act == "clipswish" and cfg.densenet_growth % 2:
        raise ConfigError(f"--densenet_growth must be even with --var-deq-act CLipSwish (the dequantiser's dense "
                          f"layers double the channels); got {cfg.densenet_growth}")
    if cfg.var_deq_cond_width % 4:
        raise ConfigError(f"--var-deq-cond-width must be a multiple of 4 (its group norms have 4 groups); "
                          f"got {cfg.var_deq_cond_width}")
    if cfg.var_deq_cond_hidden % 32:
        raise ConfigError(f"--var-deq-cond-hidden must be a multiple of 32 (its group norms have 32 groups); "
                          f"got {cfg.var_deq_cond_hidden}")


# Ranges shared by several fields.
_COEFF = Range(0, 1, lo_open=True, hi_open=True, why="a residual block is invertible only when its Lipschitz constant is below 1")
_DROPOUT = Range(0, 1, hi_open=True)
_TOL = Range(0, 1, lo_open=True)
_LIP_COEFF = Range(0, 1, lo_open=True, why="each dense layer's Lipschitz constant must stay at most 1")
_DENSE = dict(type=positive_int, range=POSITIVE, arch=True)  # the fork's integer flags, spelled with underscores

# Every field declares its flag (resflows/flags.py): help text, argparse type and choices, allowed range, and
# arch=True when it fixes the architecture (state_dict keys and shapes). n_samples sizes only the
# last_n_samples record, which a resume with another --n-samples rebuilds (as the paper's code does).
# A field that TrainConfig repeats (same name) is a train_img.py flag: its help text is the flag's.


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`resflows.ResidualFlow`.

    ``input_size`` is the (C, H, W) the data pipeline hands the model: image channels plus
    ``--padding`` channels, before ``squeeze_first`` (which the model applies itself).
    """

    input_size: Tuple[int, int, int] = flag((3, 32, 32), range=POSITIVE, arch=True)
    nblocks: Tuple[int, ...] = flag((16, 16, 16), range=POSITIVE, arch=True)
    block: str = flag("resblock", choices=("resblock", "coupling"), arch=True)
    idim: int = flag(512, "hidden channels of the residual branches", range=POSITIVE, arch=True)
    squeeze_first: bool = flag(False, arch=True)
    factor_out: bool = flag(False, arch=True)
    quadratic: bool = flag(False, "invertible 1x1 convolution before each block", arch=True)
    init_layer: Optional[str] = flag("logit", arch=True)  # 'logit', 'normalize' or None
    logit_alpha: float = flag(0.05, range=Range(0, 0.5, lo_open=True, hi_open=True))
    normalize_mean: Tuple[float, ...] = flag((0.4914, 0.4822, 0.4465), range=Range())
    normalize_std: Tuple[float, ...] = flag((0.2023, 0.1994, 0.2010), range=Range(0, lo_open=True))
    actnorm: bool = flag(True, arch=True)
    fc_actnorm: bool = flag(False, arch=True)
    batchnorm: bool = flag(False, arch=True)
    dropout: float = flag(0.0, range=_DROPOUT)
    fc: bool = flag(False, arch=True)
    coeff: float = flag(0.98, "Lipschitz target of every normalised layer", range=_COEFF)
    vnorms: Tuple[float, ...] = flag((2.0, 2.0, 2.0, 2.0), arch=True)  # orders 1..9 or inf, checked by parse_vnorms
    n_lipschitz_iters: Optional[int] = flag(None, "fixed power iterations; None = to tolerance", range=POSITIVE)
    sn_tol: float = flag(1e-3, "atol and rtol of the power iterations", range=_TOL)
    learn_p: bool = flag(False, "learn the norm orders", arch=True)
    n_power_series: Optional[int] = flag(None, "None = unbiased estimator; int = truncated series", range=POSITIVE)
    n_dist: str = flag("poisson", choices=("geometric", "poisson"))
    n_samples: int = flag(1, type=positive_int, range=POSITIVE)
    n_exact_terms: int = flag(2, "terms always computed in the power series", range=NON_NEGATIVE)
    neumann_grad: bool = flag(True, "Neumann-series gradient estimator")
    mem_eff: bool = flag(True, "memory-efficient log-det gradients (backward-in-forward)")
    # choices: the command line's; the Python API takes any name in resflows.layers.ACTIVATIONS.
    act: str = flag("swish", "swish is LipSwish; the i-DenseNets spellings CLipSwish and LeakyLSwish and the Monotone Flows "
                    "spellings CPila and CReLU are accepted",
                    type=parse_act, choices=activation_choices("img"), arch=True)
    kernels: Tuple[int, ...] = flag((3, 1, 3), range=POSITIVE, arch=True)
    fc_end: bool = flag(True, arch=True)
    fc_nblocks: int = flag(4, range=NON_NEGATIVE, arch=True)
    fc_idim: int = flag(128, range=POSITIVE, arch=True)
    preact: bool = flag(True, arch=True)
    first_resblock: bool = flag(True, arch=True)
    classification: bool = flag(False, arch=True)
    n_classes: int = flag(10, range=POSITIVE, arch=True)
    cdim: int = flag(256, "hidden width of the classification heads", range=POSITIVE, arch=True)
    # i-DenseNets (Perugachi-Diaz et al. 2021): dense residual branches, see resflows/layers/dense.py.
    densenet: bool = flag(False, "Lipschitz DenseNet residual branches (i-DenseNets)", arch=True)
    densenet_depth: int = flag(3, "dense layers per branch", name="--densenet_depth", **_DENSE)
    densenet_growth: int = flag(172, "channels each conv dense layer adds", name="--densenet_growth", **_DENSE)
    fc_densenet_growth: int = flag(32, "features each fc dense layer adds", name="--fc_densenet_growth", **_DENSE)
    learnable_concat: bool = flag(True, "learn the concatenation weights eta1, eta2", name="--learnable_concat", arch=True)
    lip_coeff: float = flag(0.98, "dense layers' concatenation weights satisfy eta1^2 + eta2^2 = lip-coeff^2",
                            range=_LIP_COEFF)
    # Monotone Flows (Ahn et al. 2022): every residual block becomes a monotone (Cayley) block, same keys
    # (resflows/layers/monotone.py). arch=True: the same weights describe another map.
    monotone_resolvent: bool = flag(False, "monotone (Cayley) blocks: solve w + g(w) = sqrt(2) x, y = sqrt(2) w - x",
                                    name="--monotone_resolvent", arch=True)
    # Variational dequantisation (resflows/layers/vardeq.py): q(u | x) from K conditioned dense blocks, the
    # Monotone Flows code's flags; q's dense layers take --densenet_depth, --densenet_growth, --learnable_concat
    # and --lip-coeff from the main flow's flags, as that code's do.
    var_deq: bool = flag(False, "learned dequantisation noise q(u|x); trains and reports the variational bound", arch=True)
    var_deq_nblocks: int = flag(2, "invertible blocks of q(u|x)", type=positive_int, range=POSITIVE, arch=True)
    var_deq_act: str = flag("clipswish", "activation of q's dense layers (CLipSwish by default)", type=parse_act,
                            choices=act.metadata["flag"].choices, arch=True)
    var_deq_mf: bool = flag(False, "monotone blocks in q(u|x) instead of residual blocks", arch=True)
    var_deq_cond_width: int = flag(64, "channels of q's conditioning network c(x) (64 in the Monotone Flows code; a multiple of 4)",
                                   type=positive_int, range=POSITIVE, arch=True)
    var_deq_cond_hidden: int = flag(512, "hidden channels of the bottlenecks of c(x) and of the injections (512 there; a multiple of 32)",
                                    type=positive_int, range=POSITIVE, arch=True)

    # Names of the fields that fix the architecture (set below the class, from the fields' arch=True).
    ARCH_FIELDS: ClassVar[Tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.input_size = tuple(int(i) for i in self.input_size)  # type: ignore[assignment]
        self.nblocks = parse_int_tuple(self.nblocks, "--nblocks")
        self.kernels = parse_int_tuple(self.kernels, "--kernels")
        self.vnorms = parse_vnorms(self.vnorms)
        self.normalize_mean = tuple(float(m) for m in self.normalize_mean)
        self.normalize_std = tuple(float(s) for s in self.normalize_std)
        self.act = parse_act(self.act)
        self.var_deq_act = parse_act(self.var_deq_act)
        self.validate()

    def validate(self) -> None:
        check_fields(self)
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
        check_monotone(self)
        if self.var_deq:
            self._validate_var_deq()
        c, h, w = self.input_size
        if self.squeeze_first and (h % 2 or w % 2):
            raise ConfigError(f"--squeeze-first needs an even image size, got {h}x{w}")
        check_scales(self)

    def _validate_densenet(self) -> None:
        if self.block != "resblock":
            raise ConfigError("--densenet True replaces the branches of residual blocks; drop --block coupling")
        if self.learn_p:
            raise ConfigError("--learn-p is not available with --densenet True (dense branches use the first --vnorms order); "
                              "drop --learn-p")
        if self.dropout:
            raise ConfigError("--dropout is not used by dense branches; drop it with --densenet True")
        doubling = {"clipswish": "CLipSwish", "cpila": "CPila", "crelu": "CReLU"}  # activations that double the channels
        for name, v in (("--densenet_growth", self.densenet_growth), ("--fc_densenet_growth", self.fc_densenet_growth)):
            if self.act in doubling and v % 2:  # (that they are >= 1 is their declared range)
                raise ConfigError(f"{name} must be even with --act {doubling[self.act]} (each conv gives half the channels, "
                                  f"the activation doubles them); got {v}")

    def _validate_var_deq(self) -> None:
        check_var_deq(self)

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


ModelConfig.ARCH_FIELDS = names_where(ModelConfig, "arch")


def _model(name: str) -> Any:
    """ModelConfig's field ``name`` (default and flag), held by TrainConfig under the same name."""
    return same_flag(ModelConfig, name)


@dataclass
class TrainConfig:
    """Every ``train_img.py`` flag of the paper's ``train_img.py`` plus ours, typed, in ``--help`` order. Field names are the
    paper's argparse destinations, so a paper checkpoint's ``args`` maps onto it directly. The model's
    settings are ModelConfig's fields (``_model``), except the three given as strings on the command line."""

    data: str = flag("cifar10", "dataset (digits: scikit-learn's 8x8 digits, offline)", choices=tuple(DATASETS), arch=True)
    dataroot: str = flag("data", "dataset root; .pth datasets live under it", run=True)
    # None: 32 (the paper's default) for every paper dataset, 8 for digits
    imagesize: Optional[int] = flag(None, "resize to this size (default 32 as the paper; digits: 8)", range=POSITIVE, arch=True)
    nbits: int = flag(8, "bit depth for celebahq", range=Range(1, 8, why="the images have 8 bits per channel"), arch=True)
    block: str = _model("block")
    coeff: float = _model("coeff")
    vnorms: str = flag("2222", "norm orders p0..pL along each residual branch (f = inf)", arch=True)
    n_lipschitz_iters: Optional[int] = _model("n_lipschitz_iters")
    sn_tol: float = _model("sn_tol")
    learn_p: bool = _model("learn_p")
    n_power_series: Optional[int] = _model("n_power_series")
    factor_out: bool = _model("factor_out")
    n_dist: str = _model("n_dist")
    n_samples: int = _model("n_samples")
    n_exact_terms: int = _model("n_exact_terms")
    var_reduc_lr: float = flag(0.0, "accepted for compatibility; unused", range=NON_NEGATIVE)
    neumann_grad: bool = _model("neumann_grad")
    mem_eff: bool = _model("mem_eff")
    act: str = _model("act")
    idim: int = _model("idim")
    nblocks: str = flag("16-16-16", "residual blocks per scale, e.g. 16-16-16", arch=True)
    squeeze_first: bool = _model("squeeze_first")
    actnorm: bool = _model("actnorm")
    fc_actnorm: bool = _model("fc_actnorm")
    batchnorm: bool = _model("batchnorm")
    dropout: float = _model("dropout")
    fc: bool = _model("fc")
    kernels: str = flag("3-1-3", "kernel sizes of each residual branch, e.g. 3-1-3", arch=True)
    logit_transform: bool = flag(True, arch=True)
    add_noise: bool = flag(True, "uniform dequantisation")
    # ours: 'paper' reproduces the paper's overlapping 5-bit bins (--nbits < 8)
    dequant: str = flag("exact", "with --nbits < 8: exact (k + u) / nvals, or the paper's ((nvals - 1) k / nvals + u) / nvals",
                        choices=("exact", "paper"))
    quadratic: bool = _model("quadratic")
    fc_end: bool = _model("fc_end")
    fc_idim: int = _model("fc_idim")
    preact: bool = _model("preact")
    padding: int = flag(0, "extra noise channels appended to the input", range=NON_NEGATIVE, arch=True)
    padding_dist: str = flag("uniform", choices=("uniform", "gaussian"))
    first_resblock: bool = _model("first_resblock")
    cdim: int = _model("cdim")
    optimizer: str = flag("adam", choices=("adam", "adamax", "rmsprop", "sgd"))
    scheduler: bool = flag(False, "cosine warm restarts (adam) / steps at 60-120-160 (sgd) after warm-up")
    nepochs: int = flag(1000, range=POSITIVE)
    batchsize: int = flag(64, "global batch size (split across torchrun ranks)", type=positive_int, range=POSITIVE)
    lr: float = flag(1e-3, range=Range(0, 10, lo_open=True, why="larger steps overflow the optimiser"))
    wd: float = flag(0.0, "weight decay (decoupled for adam)", range=NON_NEGATIVE)
    warmup_iters: int = flag(1000, range=NON_NEGATIVE)
    annealing_iters: int = flag(0, range=NON_NEGATIVE)
    save: str = flag("experiment1", "output folder", run=True)
    val_batchsize: int = flag(200, type=positive_int, range=POSITIVE)
    seed: Optional[int] = flag(None, range=Range(0, 2**32 - 1))
    ema_val: bool = flag(True, "validate with the EMA weights")
    update_freq: int = flag(1, "gradient accumulation steps", type=positive_int, range=POSITIVE)
    task: str = flag("density", choices=("density", "classification", "hybrid"), arch=True)
    scale_dim: bool = flag(False)
    rcrop_pad_mode: str = flag("reflect", choices=("constant", "edge", "reflect", "symmetric"))
    resume: Optional[str] = flag(None, "checkpoint to resume from, or to evaluate / sample from", run=True)
    begin_epoch: int = flag(0, range=NON_NEGATIVE)
    nworkers: int = flag(4, range=NON_NEGATIVE, run=True)
    print_freq: int = flag(20, type=positive_int, range=POSITIVE)
    vis_freq: int = flag(500, type=positive_int, range=POSITIVE)
    # The i-DenseNets fork's flags (its names; densenet off here so the paper's commands are unchanged).
    densenet: bool = _model("densenet")
    densenet_depth: int = _model("densenet_depth")
    densenet_growth: int = _model("densenet_growth")
    fc_densenet_growth: int = _model("fc_densenet_growth")
    learnable_concat: bool = _model("learnable_concat")
    start_learnable_concat: int = flag(25, "epochs during which the concatenation weights are reset after every step",
                                       name="--start_learnable_concat", type=nonnegative_int, range=NON_NEGATIVE)
    lip_coeff: float = _model("lip_coeff")
    # The Monotone Flows fork's flags (its names).
    monotone_resolvent: bool = _model("monotone_resolvent")
    clip_grad_norm: bool = flag(True, "clip the gradient norm at 1 (False: no clipping; the norm is still logged)",
                                name="--clip_grad_norm")
    save_freq: int = flag(0, "every N iterations also write models/most_recent_intraepoch.pth (0: off; the Monotone Flows "
                          "fork's default is 100); a multiple of --update-freq", range=NON_NEGATIVE)
    var_deq: bool = _model("var_deq")
    var_deq_nblocks: int = _model("var_deq_nblocks")
    var_deq_act: str = _model("var_deq_act")
    var_deq_mf: bool = _model("var_deq_mf")
    var_deq_cond_width: int = _model("var_deq_cond_width")
    var_deq_cond_hidden: int = _model("var_deq_cond_hidden")
    # ours: K > 1 evaluates log (1/K) sum_k p(x + u_k) / q(u_k | x) (importance-weighted, tighter)
    eval_dequant_samples: int = flag(1, "dequantisation samples per test image: 1 = the single-sample bound, "
                                     "K > 1 = the importance-weighted bound", metavar="K", type=positive_int,
                                     range=POSITIVE, run=True)
    # Ours. run=True: flags of this invocation or machine, always taken from the command line on --resume.
    max_iters: Optional[int] = flag(None, "stop after this many optimizer steps", range=POSITIVE, run=True)
    evaluate: bool = flag(False, "with --resume: report test bits/dim and exit", store_true=True, run=True)
    sample: int = flag(0, "with --resume: write a grid of N samples and exit", metavar="N", range=NON_NEGATIVE, run=True)
    temp: float = flag(1.0, "sampling temperature (std of z)", range=Range(0, lo_open=True), run=True)
    nrow: Optional[int] = flag(None, "images per row of the sample grid", range=POSITIVE, run=True)
    device: str = flag("auto", "auto, cpu, cuda or cuda:N", run=True)
    # ours: TF32 convolutions / matmuls on GPUs that have them (the paper ran full float32)
    tf32: bool = flag(False, "allow TF32 convolutions and matmuls on GPUs (default: full float32, as the paper)", run=True)
    # ours: the training step's precision (a run setting: kept on --resume unless typed); evaluation is float32
    precision: str = flag("fp32", "training precision: fp32 (full float32, as the paper), tf32 (TF32 convolutions and "
                          "matmuls on GPUs; --tf32 True means this), bf16 (residual-branch convolutions and linear layers "
                          "in bfloat16); evaluation and sampling are float32 whatever this is",
                          choices=("fp32", "tf32", "bf16"))
    # sampling: the paper's fixed-point iteration, or "anderson" (fewer evaluations)
    inverse: str = flag("fixed-point", "how samples and reconstructions invert each residual block: the paper's fixed-point "
                        "iteration, or Anderson acceleration (same stopping rule, fewer network evaluations)",
                        choices=("fixed-point", "anderson"), run=True)
    # ours: the default training path's per-block passes through torch.compile (resflows/layers/compiled.py);
    # stored with the run, changeable on --resume (checkpoints are the same either way)
    compile: bool = flag(False, "compile each residual block's training passes with torch.compile (inductor: a C++ "
                         "compiler on CPU, Triton on GPU); estimators that need a double backward stay eager")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, model: bool = True) -> None:
        """Types, ranges and choices of every field (the same rules as the command line, for a config read
        from a checkpoint too) and the checks that involve two flags; with ``model``, also the rules of the
        model these flags describe (:class:`ModelConfig`'s). Raises :class:`ConfigError`."""
        check_fields(self)
        check_monotone(self)
        if self.save_freq % self.update_freq:
            raise ConfigError(f"--save-freq {self.save_freq} must be a multiple of --update-freq {self.update_freq} "
                              f"(checkpoints are written between optimizer steps)")
        if self.data == "digits" and self.imagesize is not None and self.imagesize % 8:
            raise ConfigError(f"--imagesize for digits must be a multiple of 8 (the images are 8x8), got {self.imagesize}")
        check_choices(self)
        if not self.save:
            raise ConfigError("--save is empty; give an output folder, e.g. --save experiments/run1")
        # The model's own rules (--nblocks, --kernels, --vnorms, the i-DenseNets combinations, the scales the
        # image size allows) need only the flags: checked here, before anything is created.
        if model:
            from .factory import model_config_from

            model_config_from(self)
        if self.var_deq:
            check_var_deq(self)
        if self.var_deq and self.task != "density":
            raise ConfigError(f"--var-deq True needs --task density (got {self.task})")
        if self.var_deq and self.padding:
            raise ConfigError("--var-deq True dequantises the image channels only; drop --padding")
        if self.eval_dequant_samples > 1:
            if self.task != "density":
                raise ConfigError(f"--eval-dequant-samples needs --task density (got {self.task})")
            if self.padding:
                raise ConfigError("--eval-dequant-samples > 1 does not cover --padding channels; drop one of them")
            if not (self.var_deq or self.add_noise):
                raise ConfigError("--eval-dequant-samples > 1 needs dequantisation noise: --add-noise True or --var-deq True")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """From ``to_dict()``; keys that are not fields (written by other versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_paper_args(cls, args: Dict[str, Any]) -> "TrainConfig":
        """Map the ``argparse.Namespace`` saved in a paper checkpoint (read as a dict) onto our config.
        Unknown keys are ignored; values keep their meaning (our flags are the paper's)."""
        cfg = cls.from_dict({k: v for k, v in args.items() if not k.startswith("_")})
        cfg.act = parse_act(cfg.act)  # the i-DenseNets fork saved --act CLipSwish
        cfg.var_deq_act = parse_act(cfg.var_deq_act)  # the Monotone Flows code saved --var-deq-act CLipSwish
        # The paper stored booleans as bools (type=eval) and the numeric flags already typed.
        return cfg


def validate_config(cfg: TrainConfig, model: bool = True) -> None:
    """The rules the command line enforces (types, ranges, choices, and with ``model`` the model's own rules),
    for any TrainConfig: parsed from flags, or read from a checkpoint. Raises ConfigError with a one-line
    message naming the flag."""
    cfg.validate(model=model)


# The range tables, derived from the fields (a test checks that every numeric field has one).
TRAIN_RULES: Dict[str, Range] = rules_of(TrainConfig)
MODEL_RULES: Dict[str, Range] = rules_of(ModelConfig)
