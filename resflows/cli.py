"""The ``train_img.py`` command line: the paper's flags (same names, defaults and meaning) plus ours.

Parsing happens here, once; the rest of the package sees a typed :class:`TrainConfig`.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .config import TrainConfig, parse_bool
from .datasets import DATASETS

__all__ = ["build_parser", "parse_args", "OneLineArgumentParser", "ARCH_FLAGS", "merge_resume_config", "prepare_save_dir",
           "validate_config", "check_device"]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _bool(s: str) -> bool:
    try:
        return parse_bool(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _optional(cast, what: str):
    def parse(s: str):
        if s in ("None", "none", ""):
            return None
        try:
            return cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or None, got {s!r}") from None

    return parse


_optional_int = _optional(int, "an integer")
_optional_float = _optional(float, "a number")


def prepare_save_dir(path: str, subfolders: Sequence[str] = ()) -> str:
    """Create ``--save`` (with parents and ``subfolders``); fail with one line if it cannot be written."""
    import os

    from .config import ConfigError

    if not path:
        raise ConfigError("--save is empty; give an output folder, e.g. --save experiments/run1")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--save {path} is a file, not a folder")
    try:
        for sub in list(subfolders) or [""]:
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--save {path} is not writable ({e.strerror or e})") from None
    return path


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= ``lo``, with a message saying ``what`` was expected."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "a non-negative integer")


def _act(s: str) -> str:
    from .layers.activations import ACTIVATION_ALIASES

    return ACTIVATION_ALIASES.get(s, s)


def build_parser(prog: str = "train_img.py") -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineArgumentParser(
        prog=prog,
        description="Train a Residual Flow on images, or evaluate / sample a checkpoint (--resume CKPT --evaluate | --sample N).",
    )
    a = p.add_argument
    a("--data", type=str, default=d.data, choices=list(DATASETS), help="dataset (digits: scikit-learn's 8x8 digits, offline)")
    a("--dataroot", type=str, default=d.dataroot, help="dataset root; .pth datasets live under it")
    a("--imagesize", type=_optional_int, default=d.imagesize, help="resize to this size (default 32 as the paper; digits: 8)")
    a("--nbits", type=int, default=d.nbits, help="bit depth for celebahq")
    a("--block", type=str, choices=["resblock", "coupling"], default=d.block)
    a("--coeff", type=float, default=d.coeff, help="Lipschitz target of every normalised layer")
    a("--vnorms", type=str, default=d.vnorms, help="norm orders p0..pL along each residual branch (f = inf)")
    a("--n-lipschitz-iters", type=_optional_int, default=d.n_lipschitz_iters, help="fixed power iterations; None = to tolerance")
    a("--sn-tol", type=float, default=d.sn_tol, help="atol and rtol of the power iterations")
    a("--learn-p", type=_bool, default=d.learn_p, help="learn the norm orders")
    a("--n-power-series", type=_optional_int, default=d.n_power_series, help="None = unbiased estimator; int = truncated series")
    a("--factor-out", type=_bool, default=d.factor_out)
    a("--n-dist", choices=["geometric", "poisson"], default=d.n_dist)
    a("--n-samples", type=_positive_int, default=d.n_samples)
    a("--n-exact-terms", type=int, default=d.n_exact_terms, help="terms always computed in the power series")
    a("--var-reduc-lr", type=float, default=d.var_reduc_lr, help="accepted for compatibility; unused")
    a("--neumann-grad", type=_bool, default=d.neumann_grad, help="Neumann-series gradient estimator")
    a("--mem-eff", type=_bool, default=d.mem_eff, help="memory-efficient log-det gradients (backward-in-forward)")
    a("--act", type=_act, choices=["softplus", "elu", "swish", "lcube", "identity", "relu", "clipswish", "leakylswish"],
      default=d.act, help="swish is LipSwish; the i-DenseNets spellings CLipSwish and LeakyLSwish are accepted")
    a("--idim", type=int, default=d.idim, help="hidden channels of the residual branches")
    a("--nblocks", type=str, default=d.nblocks, help="residual blocks per scale, e.g. 16-16-16")
    a("--squeeze-first", type=_bool, default=d.squeeze_first)
    a("--actnorm", type=_bool, default=d.actnorm)
    a("--fc-actnorm", type=_bool, default=d.fc_actnorm)
    a("--batchnorm", type=_bool, default=d.batchnorm)
    a("--dropout", type=float, default=d.dropout)
    a("--fc", type=_bool, default=d.fc)
    a("--kernels", type=str, default=d.kernels, help="kernel sizes of each residual branch, e.g. 3-1-3")
    a("--logit-transform", type=_bool, default=d.logit_transform)
    a("--add-noise", type=_bool, default=d.add_noise, help="uniform dequantisation")
    a("--dequant", choices=["exact", "paper"], default=d.dequant,
      help="with --nbits < 8: exact (k + u) / nvals, or the paper's ((nvals - 1) k / nvals + u) / nvals")
    a("--quadratic", type=_bool, default=d.quadratic, help="invertible 1x1 convolution before each block")
    a("--fc-end", type=_bool, default=d.fc_end)
    a("--fc-idim", type=int, default=d.fc_idim)
    a("--preact", type=_bool, default=d.preact)
    a("--padding", type=int, default=d.padding, help="extra noise channels appended to the input")
    a("--padding-dist", type=str, choices=["uniform", "gaussian"], default=d.padding_dist)
    a("--first-resblock", type=_bool, default=d.first_resblock)
    a("--cdim", type=int, default=d.cdim, help="hidden width of the classification heads")
    a("--optimizer", type=str, choices=["adam", "adamax", "rmsprop", "sgd"], default=d.optimizer)
    a("--scheduler", type=_bool, default=d.scheduler, help="cosine warm restarts (adam) / steps at 60-120-160 (sgd) after warm-up")
    a("--nepochs", type=int, default=d.nepochs)
    a("--batchsize", type=_positive_int, default=d.batchsize, help="global batch size (split across torchrun ranks)")
    a("--lr", type=float, default=d.lr)
    a("--wd", type=float, default=d.wd, help="weight decay (decoupled for adam)")
    a("--warmup-iters", type=int, default=d.warmup_iters)
    a("--annealing-iters", type=int, default=d.annealing_iters)
    a("--save", type=str, default=d.save, help="output folder")
    a("--val-batchsize", type=_positive_int, default=d.val_batchsize)
    a("--seed", type=_optional_int, default=d.seed)
    a("--ema-val", type=_bool, default=d.ema_val, help="validate with the EMA weights")
    a("--update-freq", type=_positive_int, default=d.update_freq, help="gradient accumulation steps")
    a("--task", type=str, choices=["density", "classification", "hybrid"], default=d.task)
    a("--scale-dim", type=_bool, default=d.scale_dim)
    a("--rcrop-pad-mode", type=str, choices=["constant", "edge", "reflect", "symmetric"], default=d.rcrop_pad_mode)
    a("--resume", type=str, default=d.resume, help="checkpoint to resume from, or to evaluate / sample from")
    a("--begin-epoch", type=int, default=d.begin_epoch)
    a("--nworkers", type=int, default=d.nworkers)
    a("--print-freq", type=_positive_int, default=d.print_freq)
    a("--vis-freq", type=_positive_int, default=d.vis_freq)
    # The i-DenseNets fork's flags (Perugachi-Diaz et al. 2021), with its names; see README "Invertible DenseNets".
    a("--densenet", type=_bool, default=d.densenet, help="Lipschitz DenseNet residual branches (i-DenseNets)")
    a("--densenet_depth", type=_positive_int, default=d.densenet_depth, help="dense layers per branch")
    a("--densenet_growth", type=_positive_int, default=d.densenet_growth, help="channels each conv dense layer adds")
    a("--fc_densenet_growth", type=_positive_int, default=d.fc_densenet_growth, help="features each fc dense layer adds")
    a("--learnable_concat", type=_bool, default=d.learnable_concat, help="learn the concatenation weights eta1, eta2")
    a("--start_learnable_concat", type=_nonnegative_int, default=d.start_learnable_concat,
      help="epochs during which the concatenation weights are reset after every step")
    a("--lip-coeff", type=float, default=d.lip_coeff, help="dense layers' concatenation weights satisfy eta1^2 + eta2^2 = lip-coeff^2")
    # Ours.
    a("--max-iters", type=_optional_int, default=d.max_iters, help="stop after this many optimizer steps")
    a("--evaluate", action="store_true", help="with --resume: report test bits/dim and exit")
    a("--sample", type=int, default=d.sample, metavar="N", help="with --resume: write a grid of N samples and exit")
    a("--temp", type=float, default=d.temp, help="sampling temperature (std of z)")
    a("--nrow", type=_optional_int, default=d.nrow, help="images per row of the sample grid")
    a("--device", type=str, default=d.device, help="auto, cpu, cuda or cuda:N")
    a("--tf32", type=_bool, default=d.tf32, help="allow TF32 convolutions and matmuls on GPUs (default: full float32, as the paper)")
    a("--inverse", choices=["fixed-point", "anderson"], default=d.inverse,
      help="how samples and reconstructions invert each residual block: the paper's fixed-point iteration, or "
           "Anderson acceleration (same stopping rule, fewer network evaluations)")
    return p


# Flags that fix the architecture: on --resume they must agree with the checkpoint.
ARCH_FLAGS = (
    "data", "imagesize", "padding", "squeeze_first", "block", "idim", "nblocks", "factor_out", "quadratic",
    "actnorm", "fc_actnorm", "batchnorm", "fc", "vnorms", "learn_p", "act", "kernels", "fc_end",
    "fc_idim", "preact", "first_resblock", "cdim", "task", "logit_transform", "nbits",
    "densenet", "densenet_depth", "densenet_growth", "fc_densenet_growth", "learnable_concat",
)


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "train_img.py") -> Tuple[TrainConfig, Set[str]]:
    """Parse the command line into a config, and the set of flags given explicitly (by dest name).
    Every value is checked here (types, ranges, combinations, the device); a bad one exits with status 2
    and one line."""
    from .config import ConfigError

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # Which flags did the user type? Parse again with every default replaced by a sentinel.
    sentinel = object()
    probe = build_parser(prog)
    for action in probe._actions:
        if action.dest != "help":
            action.default = sentinel
    explicit = {k for k, v in vars(probe.parse_args(argv)).items() if v is not sentinel}
    cfg = TrainConfig(**vars(args))
    try:
        validate_config(cfg)
        _check_run_flags(cfg, explicit)
        check_device(cfg.device)
    except ConfigError as e:
        parser.error(str(e))
    return cfg, explicit


def _check_run_flags(cfg: TrainConfig, explicit: Set[str]) -> None:
    from .config import ConfigError

    # Without a positive --sample, --resume would resume *training* in the checkpoint's run folder and
    # overwrite its checkpoints: a sampling flag must never fall through to that.
    if "sample" in explicit and cfg.sample == 0:
        raise ConfigError("--sample 0 writes no samples; give the number of samples to draw, e.g. --sample 64")
    for flag in ("temp", "nrow"):
        if flag in explicit and not cfg.sample:
            raise ConfigError(f"--{flag} only applies when sampling: add --sample N (with --resume CKPT)")


@functools.lru_cache(maxsize=None)
def _choices() -> Dict[str, tuple]:
    return {a.dest: tuple(a.choices) for a in build_parser()._actions if a.choices is not None}


def validate_config(cfg: TrainConfig) -> None:
    """The rules the command line enforces (types, ranges, choices), for any TrainConfig: parsed from
    flags, or read from a checkpoint. Raises ConfigError with a one-line message naming the flag."""
    from .config import ConfigError

    cfg.validate()
    for dest, allowed in _choices().items():
        v = getattr(cfg, dest, None)
        if v not in allowed:
            raise ConfigError(f"--{dest.replace('_', '-')} must be one of {', '.join(map(str, allowed))}; got {v!r}")


def check_device(device: str) -> None:
    """``--device``: auto, cpu, cuda or cuda:N with that GPU present (or mps where available)."""
    import re

    import torch

    from .config import ConfigError

    m = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", device or "")
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
        index = int(m.group(2) or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if m.group(1) == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu (or auto)")


# Flags that describe this machine or this invocation: always taken from the command line on --resume.
RUN_FLAGS = ("resume", "dataroot", "nworkers", "device", "tf32", "evaluate", "sample", "temp", "nrow", "max_iters", "save",
             "inverse")


def merge_resume_config(saved: dict, cli: TrainConfig, explicit: Set[str], checkpoint_path: str) -> TrainConfig:
    """The checkpoint's flags, overridden by the flags typed on this command line.

    Architecture flags typed explicitly must agree with the checkpoint (compared through the model they
    build); other flags (lr, epochs, estimator settings...) may change. ``--save`` defaults to the run folder
    that holds the checkpoint (``RUN/models/x.pth`` -> ``RUN``).
    """
    import os

    from .config import ConfigError
    from .factory import model_config_from

    base = TrainConfig.from_dict(saved)
    merged = TrainConfig.from_dict(base.to_dict())
    for k in explicit:
        setattr(merged, k, getattr(cli, k))
    for k in RUN_FLAGS:
        if k not in explicit:
            setattr(merged, k, getattr(cli, k))
    if "save" not in explicit:
        folder = os.path.dirname(os.path.abspath(checkpoint_path))
        if os.path.basename(folder) == "models":
            merged.save = os.path.dirname(folder)
    validate_config(merged)
    arch_saved = model_config_from(base).architecture()
    arch_new = model_config_from(merged).architecture()
    if arch_saved != arch_new:
        typed = [k for k in ARCH_FLAGS if k in explicit and getattr(base, k) != getattr(merged, k)]
        options = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
        detail = ", ".join(f"{options.get(k, '--' + k)} {getattr(merged, k)} (checkpoint: {getattr(base, k)})" for k in typed)
        raise ConfigError(
            f"{detail or 'the flags'} conflicts with the architecture stored in {checkpoint_path}; "
            f"drop them to use the checkpoint's architecture"
        )
    return merged
