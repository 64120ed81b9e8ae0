#!/usr/bin/env python
"""Train a Residual Flow on images, or evaluate / sample a checkpoint.

    python train_img.py --data cifar10 --actnorm True --save experiments/cifar10
    python train_img.py --resume experiments/cifar10/models/most_recent.pth --evaluate
    python train_img.py --resume experiments/cifar10/models/most_recent.pth --sample 64 --temp 0.8
    torchrun --nproc_per_node=4 train_img.py --data cifar10 --actnorm True --save experiments/cifar10

Flags are the paper's (same names, defaults and meaning; see --help and README.md). This script only
parses flags, builds through factories and hands over to resflows.trainer.Trainer.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from resflows import evaluation
from resflows.atomic import write_json
from resflows.budget import check_image_run
from resflows.checkpoint import read_checkpoint
from resflows.checkpoint_checks import check_weights_fit
from resflows.cli import merge_resume_config, parse_args
from resflows.config import ConfigError, ModelConfig, TrainConfig
from resflows.distributed import DistInfo, barrier, cleanup_distributed, rank_seed, setup_distributed
from resflows.entry import SaveLock, prepare_save_dir, remove_leftovers, run_entry_point
from resflows.evaluation import image_shape, prepare_for_eval, save_samples, tighten_lipschitz
from resflows.factory import model_config_from
from resflows.loaders import RunData, build_data
from resflows.loading import load_weights
from resflows.model import ResidualFlow
from resflows.runlog import DeferredStop, TrainingError, setup_logger, stop_on_signals
from resflows.runtime import check_precision, set_tf32, tune_cpu_runtime
from resflows.trainer import Trainer, run_finished

PROG = "train_img.py"


def run(argv: Optional[Sequence[str]] = None, hook: Optional[Callable[[str, Trainer], None]] = None) -> int:
    """Parse, build, hand over to the Trainer. ``hook(stage, trainer)`` is called with stage 'ready'
    (before training) and 'done' (after), for tests and tooling."""
    with contextlib.ExitStack() as held:  # the --save lock, released however the run ends
        pending = held.enter_context(DeferredStop())  # SIGTERM while starting or after the final save: exit 0
        return _run(argv, hook, held, pending)


def _run(argv: Optional[Sequence[str]], hook: Optional[Callable[[str, Trainer], None]], held: contextlib.ExitStack,
         pending: DeferredStop) -> int:
    cfg, explicit = parse_args(argv, PROG)
    if cfg.evaluate or cfg.sample:
        pending.release()  # a signal simply ends an evaluation or sampling (nothing to save)
        if pending.signal:
            return 0
    dist = setup_distributed(cfg.device)
    if cfg.batchsize % dist.world_size:
        raise ConfigError(f"--batchsize {cfg.batchsize} is the global batch and must divide evenly over {dist.world_size} ranks")
    ckpt = None
    if cfg.resume:
        ckpt = read_checkpoint(cfg.resume, map_location="cpu")
        cfg = merge_resume_config(ckpt["config"], cfg, explicit, cfg.resume)
        check_image_run(cfg)  # --sample, --val-batchsize, --batchsize with the checkpoint's architecture
        if model_config_from(cfg).architecture() != ModelConfig.from_dict(ckpt["model_config"]).architecture():
            check_weights_fit(cfg.resume, ckpt, model_config_from(cfg))  # before allocating the model
    if cfg.seed is None:
        cfg.seed = random.SystemRandom().randrange(2**31)
    training = not (cfg.evaluate or cfg.sample)
    if training and ckpt is not None and ckpt.get("format") == "resflows":
        done = run_finished(cfg, ckpt["epoch"], ckpt.get("step", ckpt["itr"]))
        if done:  # before the folder is touched: nothing changes
            print(f"{PROG}: {cfg.resume} {done}; nothing to do (raise --max-iters or --nepochs to train on)")
            return 0
    # Every check of the flags, the checkpoint and the data runs before the --save folder is touched: a refused
    # run leaves it as it was (no logs, no lock file, no clean-up).
    data = build_data(cfg, dist, train=training) if training or cfg.evaluate else None  # sampling needs no data
    torch.manual_seed(cfg.seed)  # the same initial weights and power-iteration vectors on every rank
    # Full float32 unless --precision tf32 (for training only): torch runs float32 convolutions in TF32 on
    # recent GPUs by default, and the paper's runs were full float32 (bits/dim and the power iterations move
    # with TF32). Evaluating and sampling are float32 whatever the training precision.
    set_tf32(training and cfg.precision == "tf32")
    try:
        precision_line = check_precision(cfg.precision if training else "fp32", dist.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dist.device.type == "cpu":
        tune_cpu_runtime()  # flush denormals, reuse freed buffers (see resflows/runtime.py)
    save_dir = prepare_save_dir(cfg.save, ("models",)) if dist.is_main else cfg.save
    if training and dist.is_main:  # evaluating or sampling never touches models/: no lock needed
        held.enter_context(SaveLock(save_dir))
    log = setup_logger(save_dir, dist.is_main)
    if training and dist.is_main:
        remove_leftovers([os.path.join(save_dir, "models")])
    log.info("%s %s", PROG, " ".join(sys.argv[1:] if argv is None else argv))
    log.info("seed %d, device %s, %d rank(s)", cfg.seed, dist.device, dist.world_size)
    log.info("%s", precision_line)
    if cfg.data == "celebahq" and cfg.nbits < 8 and cfg.dequant == "exact":
        log.info("dequantisation: exact (k + u) / %d; --dequant paper uses the paper's ((%d k / %d) + u) / %d "
                 "(overlapping bins, bits/dim up to %.3f lower)", 2**cfg.nbits, 2**cfg.nbits - 1, 2**cfg.nbits,
                 2**cfg.nbits, math.log2(2**cfg.nbits / (2**cfg.nbits - 1)))

    model = ResidualFlow(model_config_from(cfg))
    seed = rank_seed(cfg.seed, dist.rank, dist.world_size)  # then per-rank streams for probes and truncation draws
    torch.manual_seed(seed)
    random.seed(seed)
    log.info("model: %d parameters, latent dim %d", sum(p.numel() for p in model.parameters()), model.latent_dim)
    if cfg.evaluate or cfg.sample:
        _evaluate_or_sample(cfg, dist, model, ckpt, save_dir, data)
        return 0

    trainer = Trainer(cfg, dist, model, save_dir, ckpt=ckpt, ckpt_path=cfg.resume, data=data)
    if ckpt is not None:
        log.info("resumed from %s at epoch %d, step %d", cfg.resume, trainer.epoch, trainer.step)
        if dist.is_main and ckpt.get("format") == "resflows" and trainer.best_are_here:
            # Only the checkpoints the resumed state lists as its best belong to this run (a run killed between
            # writing a new best and deleting the one it displaced leaves one too many); a checkpoint read from
            # another folder never causes a deletion.
            remove_leftovers([os.path.join(save_dir, "models")], [b[2] for b in trainer.best])
        done = trainer.finished()
        if done:
            print(f"{PROG}: {cfg.resume} {done}; nothing to do (raise --max-iters or --nepochs to train on)")
            return 0
    if hook:
        hook("ready", trainer)
    with stop_on_signals(trainer, pending):
        trainer.fit()
    if hook:
        hook("done", trainer)
    if trainer.stop_signal:
        log.info("saved %s; continue with --resume", os.path.join(save_dir, "models", "most_recent.pth"))
    return 0


def _evaluate_or_sample(cfg: TrainConfig, dist: DistInfo, model: ResidualFlow, ckpt: Dict[str, Any], save_dir: str,
                        data: Optional[RunData]) -> None:
    """--sample, then --evaluate, with the checkpoint's weights (its EMA unless --ema-val False); only the
    weights are taken, so --seed governs the draws. Every rank takes part (the power iterations are
    collective); rank 0 writes."""
    model = model.to(dist.device)
    ema = load_weights(cfg.resume, ckpt, model)
    chosen = ema.model if cfg.ema_val else model
    if cfg.sample:
        prepare_for_eval(chosen).set_inverse_method(cfg.inverse)
        if dist.is_main:
            path = save_samples(chosen, cfg.sample, cfg.temp, os.path.join(save_dir, "samples"), image_shape(cfg)[0],
                                cfg.nrow, dist.device)
            print(f"wrote {cfg.sample} samples to {path}")
        barrier()
    if cfg.evaluate:
        loader = data.test_loader
        prepare_for_eval(chosen)
        tighten_lipschitz(chosen)
        res = evaluation.evaluate(chosen, loader, cfg, dist.device, dist.is_main)
        if not all(math.isfinite(v) for v in res.values() if isinstance(v, float)):
            raise TrainingError(f"evaluating {cfg.resume} gave non-finite results ({', '.join(f'{k} {v}' for k, v in res.items())}); "
                                f"its weights are unstable: evaluate an earlier checkpoint")
        if dist.is_main and "test_bpd" in res:
            print(f"test bits/dim: {res['test_bpd']:.4f} +- {res['test_bpd_stderr']:.4f} ({res['n_images']} images)")
        if dist.is_main and "test_acc" in res:
            print(f"test accuracy: {res['test_acc']:.4f} ({res['n_images']} images)")
        if dist.is_main:
            out = {**res, "checkpoint": os.path.abspath(cfg.resume), "ema": bool(cfg.ema_val and ckpt.get("ema") is not None),
                   "seed": cfg.seed, "dequant": cfg.dequant}
            write_json(os.path.join(save_dir, "eval.json"), out)
            print(f"wrote {os.path.join(save_dir, 'eval.json')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: exit 0, or one line on stderr for a user error (a traceback only for a bug)."""
    try:
        return run_entry_point(PROG, lambda: run(argv))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
