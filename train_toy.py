#!/usr/bin/env python
"""Train a Residual Flow (or a RealNVP baseline) on a 2-D toy density and watch it learn.

    python train_toy.py --data pinwheel --save experiments/toy_pinwheel
    python train_toy.py --data 8gaussians --nblocks 10 --dims 64-64-64 --viz_samples 20000

Writes under --save: ``logs``, ``tb/`` (TensorBoard), ``figs/ITER.png`` (data | model density | model
samples, 900 x 300 pixels), ``checkpt.pth`` (best test loss) and ``last.pth`` (at the end, or on
SIGINT / SIGTERM). Flags are the paper's toy script's (names and defaults; see --help). This script only parses flags, builds
the model through resflows.toy and hands over to resflows.toy.ToyTrainer.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional, Sequence

import torch

from resflows.config import ConfigError
from resflows.entry import SaveLock, prepare_save_dir, remove_leftovers, run_entry_point
from resflows.runlog import DeferredStop, setup_logger, stop_on_signals
from resflows.runtime import check_precision, set_tf32
from resflows.toy import ToyConfig, ToyTrainer, build_toy_model
from resflows.toy.cli import parse_args, toy_device
from resflows.toy.train import prepare_runtime

PROG = "train_toy.py"


def pick_device(gpu: int) -> torch.device:
    """cuda:GPU when CUDA is available (as the paper), else the CPU."""
    return toy_device(gpu)


def run(argv: Optional[Sequence[str]] = None) -> ToyTrainer:
    """Parse, build, train; returns the trainer (for tests and tooling)."""
    with contextlib.ExitStack() as held:  # the --save lock, released however the run ends
        pending = held.enter_context(DeferredStop())  # SIGTERM while starting or after the final save: exit 0
        return _run(argv, held, pending)


def _run(argv: Optional[Sequence[str]], held: contextlib.ExitStack, pending: DeferredStop) -> ToyTrainer:
    cfg: ToyConfig = parse_args(argv, PROG)
    device = pick_device(cfg.gpu)
    save_dir = prepare_save_dir(cfg.save)
    held.enter_context(SaveLock(save_dir))
    log = setup_logger(save_dir, is_main=True)
    remove_leftovers([save_dir])
    log.info("%s %s", PROG, " ".join(sys.argv[1:] if argv is None else argv))
    torch.manual_seed(cfg.seed)  # initial weights, power-iteration vectors, probes and series lengths
    prepare_runtime(device)
    set_tf32(cfg.precision == "tf32")  # training only: validation and figures switch it off
    try:
        log.info("%s", check_precision(cfg.precision, device))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = build_toy_model(cfg)
    log.info("config: %s", cfg.to_dict())
    log.info("model: %s, %d blocks, %d parameters, device %s", cfg.arch, cfg.nblocks,
             sum(p.numel() for p in model.parameters() if p.requires_grad), device)
    trainer = ToyTrainer(cfg, model, device, save_dir)
    trainer.open_writer()
    try:
        with stop_on_signals(trainer, pending):
            trainer.fit()
    finally:
        trainer.close()
    return trainer


def _trained(trainer: ToyTrainer) -> int:
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: exit 0, or one line on stderr for a user error (a traceback only for a bug)."""
    try:
        return run_entry_point(PROG, lambda: _trained(run(argv)))
    finally:
        # Release SAVE/logs (setup_logger attaches a file handler to the shared 'resflows' logger).
        import logging

        log = logging.getLogger("resflows")
        for h in list(log.handlers):
            h.close()
            log.removeHandler(h)


if __name__ == "__main__":
    sys.exit(main())
