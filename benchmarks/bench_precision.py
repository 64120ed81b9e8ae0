#!/usr/bin/env python
"""Training equivalence of ``--precision bf16`` and ``fp32``: the same runs in both, float32 test bits/dim.

    python benchmarks/bench_precision.py                   # 3 seeds x (fp32, bf16), 300 steps each
    python benchmarks/bench_precision.py --seeds 1 --steps 50

Each run is ``train_img.py`` on the bundled digits (``--data digits --nblocks 3-3``, narrowed to ``--idim 32
--fc-idim 64`` at batch 32 to fit a shared 2-core CPU, ``--warmup-iters 20`` so that the runs leave the LR
warm-up) for ``--steps`` optimiser steps with ``--precision P --seed S``, then ``--resume ... --evaluate --ema-val False --seed 0``: the
trained weights' test bits/dim over the 297 test images, computed in float32 whatever the training precision.
(Not the EMA's: with decay 0.999, after a few hundred steps it still holds most of the initial weights, which
both precisions share, so it would hide the difference this measures.) Runs alternate
(seed 1 fp32, seed 1 bf16, seed 2 fp32, ...). The claim checked: the mean test bits/dim of the two
precisions agree within 0.02. Results go to ``results/bench_precision.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FLAGS = ["--data", "digits", "--nblocks", "3-3", "--idim", "32", "--fc-idim", "64", "--batchsize", "32",
         "--warmup-iters", "20", "--nworkers", "0", "--print-freq", "1000", "--vis-freq", "100000"]
TOLERANCE = 0.02  # bits/dim between the two precisions' means


def train_and_evaluate(precision: str, seed: int, steps: int, save: str, timeout: int) -> dict:
    """One training run and its float32 evaluation: test bits/dim, its standard error, training seconds."""
    script = os.path.join(REPO, "train_img.py")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, script, *FLAGS, "--precision", precision, "--seed", str(seed),
                    "--max-iters", str(steps), "--save", save], cwd=REPO, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
    subprocess.run([sys.executable, script, "--resume", os.path.join(save, "models", "most_recent.pth"), "--evaluate",
                    "--ema-val", "False", "--seed", "0", "--nworkers", "0", "--save", save], cwd=REPO, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(save, "eval.json")) as f:
        res = json.load(f)
    return {"precision": precision, "seed": seed, "test_bpd": res["test_bpd"], "test_bpd_stderr": res["test_bpd_stderr"],
            "train_s": train_s, "load_1min": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16"])
    p.add_argument("--timeout", type=int, default=7200, help="seconds per train_img.py process")
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_precision.json"))
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be at least 1")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as work:
        for seed in range(1, args.seeds + 1):
            for prec in args.precision:
                run = train_and_evaluate(prec, seed, args.steps, os.path.join(work, f"{prec}-{seed}"), args.timeout)
                runs.append(run)
                print(json.dumps(run), flush=True)
    means = {prec: statistics.mean(r["test_bpd"] for r in runs if r["precision"] == prec) for prec in args.precision}
    summary = {"mean_test_bpd": means, "steps": args.steps, "seeds": args.seeds}
    if len(means) == 2:
        a, b = means.values()
        summary.update(difference=b - a, within_tolerance=abs(b - a) <= TOLERANCE, tolerance=TOLERANCE)
    print(json.dumps(summary))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"flags": FLAGS, "runs": runs, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
