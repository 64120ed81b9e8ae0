"""The ``train_img.py`` command line: the paper's flags (same names, defaults and meaning) plus ours.

Parsing happens here, once; the rest of the package sees a typed :class:`TrainConfig`.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Set, Tuple

from .config import ConfigError, ModelConfig, TrainConfig, validate_config
from .flags import OneLineArgumentParser, add_flags, names_where, option

__all__ = ["build_parser", "parse_args", "OneLineArgumentParser", "ARCH_FLAGS", "RUN_FLAGS", "merge_resume_config",
           "validate_config", "check_device"]


def build_parser(prog: str = "train_img.py", defaults: bool = True) -> argparse.ArgumentParser:
    """The ``train_img.py`` parser: one flag per :class:`TrainConfig` field (see ``resflows/flags.py``).
    ``defaults=False`` leaves the flags not typed out of the parsed namespace."""
    p = OneLineArgumentParser(
        prog=prog,
        description="Train a Residual Flow on images, or evaluate / sample a checkpoint (--resume CKPT --evaluate | --sample N).",
    )
    return add_flags(p, TrainConfig, defaults)


# Flags that fix the architecture: on --resume they must agree with the checkpoint.
ARCH_FLAGS = names_where(TrainConfig, "arch")
# Flags that describe this machine or this invocation: always taken from the command line on --resume.
RUN_FLAGS = names_where(TrainConfig, "run")


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "train_img.py") -> Tuple[TrainConfig, Set[str]]:
    """Parse the command line into a config, and the set of flags given explicitly (by dest name).
    Every value is checked here (types, ranges, combinations, the device); a bad one exits with status 2
    and one line."""
    # Parse without defaults: the namespace holds exactly the flags typed, and TrainConfig fills in the rest.
    parser = build_parser(prog, defaults=False)
    explicit = vars(parser.parse_args(argv))
    if explicit.get("tf32"):  # --tf32 True is the older spelling of --precision tf32
        if explicit.get("precision", "tf32") != "tf32":
            parser.error(f"--tf32 True means --precision tf32, which conflicts with --precision {explicit['precision']}; "
                         f"drop --tf32")
        explicit["precision"] = "tf32"
    cfg = TrainConfig(**explicit)
    try:
        _check_run_flags(cfg, explicit)
        # With --resume the architecture is the checkpoint's (merge_resume_config checks the merged flags); the
        # strings typed here are still checked for their syntax.
        validate_config(cfg, model=not cfg.resume)
        if cfg.resume:
            _check_typed_strings(explicit)
        check_device(cfg.device)
        if not cfg.resume:  # (with --resume the architecture is the checkpoint's: train_img.py checks it after reading)
            from .budget import check_image_run

            check_image_run(cfg)
    except ConfigError as e:
        parser.error(str(e))
    return cfg, set(explicit)


def _check_run_flags(cfg: TrainConfig, explicit: Set[str]) -> None:
    # Without a positive --sample, --resume would resume *training* in the checkpoint's run folder and
    # overwrite its checkpoints: a sampling flag must never fall through to that.
    if (cfg.evaluate or cfg.sample) and not cfg.resume:
        raise ConfigError("--evaluate and --sample need a checkpoint: add --resume PATH")
    if "sample" in explicit and cfg.sample == 0:
        raise ConfigError("--sample 0 writes no samples; give the number of samples to draw, e.g. --sample 64")
    for flag in ("temp", "nrow"):
        if flag in explicit and not cfg.sample:
            raise ConfigError(f"--{flag} only applies when sampling: add --sample N (with --resume CKPT)")


def _check_typed_strings(explicit: dict) -> None:
    from .config import parse_int_tuple, parse_vnorms

    for name in ("nblocks", "kernels"):
        if name in explicit:
            parse_int_tuple(explicit[name], f"--{name}")
    if "vnorms" in explicit:
        parse_vnorms(explicit["vnorms"])


def check_device(device: str) -> None:
    """``--device``: auto, cpu, cuda or cuda:N with that GPU present (or mps where available)."""
    import re

    import torch

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


def merge_resume_config(saved: dict, cli: TrainConfig, explicit: Set[str], checkpoint_path: str) -> TrainConfig:
    """The checkpoint's flags, overridden by the flags typed on this command line.

    Architecture flags typed explicitly must agree with the checkpoint (compared through the model they
    build); other flags (lr, epochs, estimator settings...) may change. ``--save`` defaults to the run folder
    that holds the checkpoint (``RUN/models/x.pth`` -> ``RUN``).
    """
    import dataclasses
    import os

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
    # Architecture flags that are not model settings (--data, --nbits, --task...) decide what the model sees
    # (the logit transform's alpha, the levels): compared as they are.
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    data_flags = [k for k in ARCH_FLAGS if k in explicit and k not in model_fields and getattr(base, k) != getattr(merged, k)]
    if arch_saved != arch_new or data_flags:
        typed = [k for k in ARCH_FLAGS if k in explicit and getattr(base, k) != getattr(merged, k)]
        options = {f.name: option(f) for f in dataclasses.fields(TrainConfig)}
        detail = ", ".join(f"{options[k]} {getattr(merged, k)} (checkpoint: {getattr(base, k)})" for k in typed)
        raise ConfigError(
            f"{detail or 'the flags'} conflicts with the architecture stored in {checkpoint_path}; "
            f"drop them to use the checkpoint's architecture"
        )
    return merged
