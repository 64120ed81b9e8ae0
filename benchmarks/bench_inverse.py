#!/usr/bin/env python
"""Sampling speed of the two inverses (``--inverse fixed-point`` / ``anderson``) on a trained checkpoint.

    python benchmarks/bench_inverse.py CHECKPOINT [--samples 64] [--rounds 3]

For each method, in a fresh process (alternating fixed-point, anderson, ... for ``--rounds`` rounds): the
checkpoint's EMA weights (power iterations re-run, as ``train_img.py --sample``), ``--samples`` latents
``z ~ N(0, I)`` inverted through the model (images/s), the mean number of network evaluations per residual
block, and the reconstruction error ``max |x - f^-1(f(x))|`` over ``--samples`` test images.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METHODS = ("fixed-point", "anderson")


def child(args) -> None:
    import torch

    sys.path.insert(0, REPO)
    from resflows.checkpoint import read_checkpoint
    from resflows.config import TrainConfig
    from resflows.factory import model_config_from
    from resflows.model import ResidualFlow
    from resflows.runtime import tune_cpu_runtime

    tune_cpu_runtime()
    ckpt = read_checkpoint(args.checkpoint, map_location="cpu")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = ResidualFlow(model_config_from(cfg))
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    model.update_lipschitz()
    model.eval().set_inverse_method(args.method)
    blocks = model.iresblocks()
    torch.manual_seed(0)
    z = torch.randn(args.samples, model.latent_dim)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.inverse(z)
        sample_s = time.perf_counter() - t0
        evals = sum(b.last_inverse_iters for b in blocks) / len(blocks)
        x = _test_images(cfg, args.samples)
        err = float((model.inverse(model.transform(x)) - x).abs().max())
    print(json.dumps({"method": args.method, "sample_s": sample_s, "images_per_s": args.samples / sample_s,
                      "evals_per_block": evals, "max_reconstruction_error": err, "load": os.getloadavg()[0]}))


def _test_images(cfg, n):
    """The first ``n`` test images of the checkpoint's dataset (dequantised, in [0, 1]), padded as in training."""
    import torch

    from resflows.datasets import build_dataset

    test = build_dataset(cfg.data, train=False, dataroot=cfg.dataroot, imagesize=cfg.imagesize, nbits=cfg.nbits,
                         padding=cfg.padding, padding_dist=cfg.padding_dist, seed=0)
    return torch.stack([test[i][0] for i in range(n)])


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    from common import BenchError, OneLineArgumentParser, check_json_path, child_result, int_at_least, write_results

    p = OneLineArgumentParser(prog="bench_inverse.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int_at_least(1), default=64)
    p.add_argument("--rounds", type=int_at_least(1), default=3)
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_inverse.json"),
                   help="results file, replaced only when every measurement succeeds")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="fixed-point", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    try:
        check_json_path(args.json)
    except BenchError as e:
        p.error(str(e))
    from resflows.checkpoint import CheckpointError, read_checkpoint

    try:  # a missing, damaged or foreign checkpoint: one line, before any measurement
        read_checkpoint(args.checkpoint, map_location="cpu")
    except CheckpointError as e:
        raise BenchError(f"{e}; {args.json} left unchanged") from None
    runs = []
    for r in range(args.rounds):
        for method in METHODS:
            cmd = [sys.executable, os.path.abspath(__file__), args.checkpoint, "--child", "--method", method,
                   "--samples", str(args.samples)]
            res = {"method": method, **child_result(subprocess.run(cmd, capture_output=True, text=True, cwd=REPO))}
            res["round"] = r
            runs.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "bug_report"}), flush=True)
    summary = {}
    for method in METHODS:
        ok = [x for x in runs if x["method"] == method and "images_per_s" in x]
        if ok:
            summary[method] = {k: statistics.median(x[k] for x in ok)
                               for k in ("images_per_s", "evals_per_block", "max_reconstruction_error", "load")}
    from common import report_failures

    report_failures(runs)
    print(json.dumps(summary, indent=1))
    write_results(args.json, {"checkpoint": args.checkpoint, "samples": args.samples, "runs": runs, "summary": summary})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from common import run_main

    sys.exit(run_main(main, "bench_inverse.py"))
