"""Uniform against variational dequantisation on the bundled digits: the same flow trained for the same number of
steps with each (several seeds), then test bits/dim of the single-sample bound and of the importance-weighted bound
with K samples (``--eval-dequant-samples K``), as mean +- standard error over the seeds.

    python benchmarks/bench_vardeq.py                   # 2 seeds, 400 steps, K = 16
    python benchmarks/bench_vardeq.py --steps 100 --seeds 2 --out /tmp/vd.json

Writes benchmarks/results/bench_vardeq.json (or --out) with every run's figures.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import train_img  # noqa: E402
from resflows.flags import OneLineArgumentParser, int_at_least, positive_int  # noqa: E402

# One flow for both: two scales of 2 residual blocks; q(u|x) of 2 conditioned dense blocks (small conditioning net).
MODEL = ["--data", "digits", "--nblocks", "2-2", "--idim", "32", "--fc-end", "False", "--batchsize", "64",
         "--lr", "3e-3", "--warmup-iters", "20", "--nworkers", "0", "--print-freq", "50", "--vis-freq", "100000"]
VARDEQ = ["--var-deq", "True", "--var-deq-nblocks", "2", "--densenet_depth", "2", "--densenet_growth", "16",
          "--var-deq-cond-width", "16", "--var-deq-cond-hidden", "32"]


def run(argv):
    code = train_img.main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"train_img.py {' '.join(map(str, argv))} exited with {code}")


def mean_se(values):
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def main() -> None:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive_int, default=400)
    p.add_argument("--seeds", type=int_at_least(2, "an integer >= 2 (a standard error needs two runs)"), default=2)
    p.add_argument("--k", type=int_at_least(2, "an integer >= 2"), default=16, help="importance samples of the tighter bound")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_vardeq.json"))
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in (("uniform", []), ("variational", VARDEQ)):
            for seed in range(args.seeds):
                save = os.path.join(tmp, f"{mode}{seed}")
                t0 = time.time()
                run(MODEL + extra + ["--seed", seed, "--max-iters", args.steps, "--save", save])
                train_s = time.time() - t0
                ckpt = os.path.join(save, "models", "most_recent.pth")
                res = {"mode": mode, "seed": seed, "steps": args.steps, "train_seconds": train_s}
                for k in (1, args.k):
                    out = os.path.join(tmp, f"eval_{mode}{seed}_{k}")
                    run(["--resume", ckpt, "--evaluate", "--eval-dequant-samples", k, "--seed", 100 + seed,
                         "--nworkers", 0, "--save", out])
                    with open(os.path.join(out, "eval.json")) as f:
                        e = json.load(f)
                    res[f"test_bpd_k{k}"], res[f"test_bpd_stderr_k{k}"] = e["test_bpd"], e["test_bpd_stderr"]
                runs.append(res)
                print(json.dumps(res), flush=True)
    summary = {}
    for mode in ("uniform", "variational"):
        for k in (1, args.k):
            m, se = mean_se([r[f"test_bpd_k{k}"] for r in runs if r["mode"] == mode])
            summary[f"{mode}_k{k}"] = {"mean": m, "stderr_over_seeds": se}
    report = {"model": MODEL, "vardeq": VARDEQ, "steps": args.steps, "seeds": args.seeds, "k": args.k, "runs": runs,
              "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for key, v in summary.items():
        print(f"{key:18s} test bits/dim {v['mean']:.4f} +- {v['stderr_over_seeds']:.4f}")


if __name__ == "__main__":
    main()
