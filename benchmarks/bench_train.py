#!/usr/bin/env python
"""Training-step speed and peak memory for named configurations and gradient modes.

    python benchmarks/bench_train.py --preset make         # what `make bench` runs (~5 min on 2 CPU cores)
    python benchmarks/bench_train.py --config mnist --mode both naive --steps 10
    python benchmarks/bench_train.py --config cifar10-b64 --device cuda   # on a GPU
    python benchmarks/bench_train.py --config idensenet-cifar10          # i-DenseNets' CIFAR-10 command, batch 4
    python benchmarks/bench_train.py --config idensenet-cifar10-b64 --device cuda
    python benchmarks/bench_train.py --config cifar10 --precision fp32 bf16 --rounds 2   # interleaved precisions
    python benchmarks/bench_train.py --config monotone-cifar10           # Monotone Flows' CIFAR-10 command, batch 4

Each measurement runs in a fresh process: model and optimiser are built, ActNorm is initialised, then
``--warmup`` steps are discarded and the median of ``--steps`` full training steps is reported (forward,
backward, clip, optimiser step, Lipschitz update, EMA update, exactly as train_img.py does them). Peak memory
is the process's peak RSS on CPU and ``torch.cuda.max_memory_allocated`` on GPU. ``--sweep`` repeats the
memory measurement for truncated series of 2, 5, 10 and 20 terms: with Neumann gradients and memory-efficient
log-det gradients the peak stays flat while naive gradients grow with the number of terms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    CONFIGS,
    MODES,
    OneLineArgumentParser,
    bench_trainer,
    int_at_least,
    machine,
    parse_bench_args,
    peak_rss_mb,
    report_failures,
    rss_mb,
    run_child,
    run_main,
    table,
    train_config,
    write_results,
)

PRESETS = {
    # name: list of (config, mode, terms); terms None = the unbiased estimator
    "make": [("mnist", m, None) for m in MODES] + [("mnist", m, t) for m in ("naive", "both") for t in (2, 5, 10, 20)]
    + [("cifar10", "both", None), ("toy", "both", None)],
    "quick": [("mnist", "both", None), ("mnist", "naive", None)],
}


def child(args) -> None:
    import torch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        try:
            from resflows.runtime import tune_cpu_runtime
        except ImportError:  # an older resflows, measured for the before/after table
            tune_cpu_runtime = lambda: torch.set_flush_denormal(True)  # noqa: E731
        tune_cpu_runtime()  # as train_img.py does
    torch.manual_seed(0)
    if args.config == "toy":
        return child_toy(args, device)
    cfg = train_config(args.config, n_power_series=args.terms, seed=0, **MODES[args.mode])
    if args.batch:
        cfg.batchsize = args.batch
    cfg.compile = args.compile
    if args.precision:
        cfg.precision = args.precision[0]
        if cfg.precision == "tf32":
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    trainer, x, y = bench_trainer(cfg, device)
    fixed_bpd = fixed_batch_bpd(trainer, x, cfg.precision) if args.precision else None
    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.forward_backward(x, y, sync=True, n_accum=1)
        trainer.optimize(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steps = times[args.warmup:]
    out = {"median_s": statistics.median(steps), "min_s": min(steps), "max_s": max(steps),
           "images_per_s": cfg.batchsize / statistics.median(steps), "baseline_rss_mb": base, "peak_rss_mb": peak_rss_mb(),
           "first_step_s": times[0]}
    compiled = getattr(trainer, "compiled", None)
    if compiled is not None:  # --compile: graphs built and the time spent building them (all in the first step)
        out.update(compile_s=compiled.seconds, graphs=compiled.graphs)
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if fixed_bpd is not None:
        out["fixed_batch_bpd"] = fixed_bpd
    its = trainer.model.solver_iterations() if hasattr(trainer.model, "solver_iterations") else {}
    if its:  # monotone blocks: evaluations of the branch in the last step's forward and adjoint solves, per block
        out["solver_iterations"] = {name: {k: v for k, v in n.items() if k != "inverse"} for name, n in its.items()}
    print(json.dumps(out))


def fixed_batch_bpd(trainer, x, precision: str) -> float:
    """Mean bits/dim of the benchmark batch at the initial weights, in training mode under ``precision``, with
    fixed probes and truncation draws: the same number in every precision up to its rounding."""
    import torch

    from resflows.layers.precision import branch_dtype
    from resflows.losses import bits_per_dim
    from resflows.runtime import compute_dtype

    torch.manual_seed(1234)
    trainer.model.train()
    with torch.no_grad(), branch_dtype(compute_dtype(precision)):
        z, logdet = trainer.model(x)
        return float(bits_per_dim(z, logdet, trainer.image_shape, trainer.nvals).mean())


def child_toy(args, device) -> None:
    """train_toy.py's default model (100 blocks, 128-128-128-128, batch 500) on 8gaussians, one
    ToyTrainer.run_step per step (loss, backward, optimiser step, Lipschitz update)."""
    from resflows.toy import ToyConfig, ToyTrainer, build_toy_model

    cfg = ToyConfig(data="8gaussians", n_power_series=args.terms, test_batch_size=10)
    model = build_toy_model(cfg)
    for block in model.iresblocks() if hasattr(model, "iresblocks") else []:
        block.neumann_grad, block.grad_in_forward = MODES[args.mode]["neumann_grad"], MODES[args.mode]["mem_eff"]
    trainer = ToyTrainer(cfg, model, device, tempfile.mkdtemp())
    base = rss_mb()
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.run_step()
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steps = times[args.warmup:]
    print(json.dumps({"median_s": statistics.median(steps), "min_s": min(steps), "max_s": max(steps),
                      "images_per_s": cfg.batch_size / statistics.median(steps), "baseline_rss_mb": base,
                      "peak_rss_mb": peak_rss_mb()}))


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a predefined list of measurements")
    p.add_argument("--config", nargs="+", default=["mnist"], choices=sorted(CONFIGS) + ["toy"])
    p.add_argument("--mode", nargs="+", default=["both"], choices=sorted(MODES))
    p.add_argument("--sweep", action="store_true", help="also measure truncated series of 2, 5, 10, 20 terms")
    p.add_argument("--terms", type=int_at_least(1), default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int_at_least(1), default=None, help="override the configuration's batch size")
    p.add_argument("--steps", type=int_at_least(1), default=7)
    p.add_argument("--warmup", type=int_at_least(0), default=2)
    p.add_argument("--compile", action="store_true", help="train with --compile True (see bench_compile.py)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "tf32", "bf16"], default=None,
                   help="train_img.py's --precision; several: each job runs with each, interleaved")
    p.add_argument("--rounds", type=int_at_least(1), default=1, help="repeat the list of jobs (interleaved rounds)")
    args = parse_bench_args(p, argv, "bench_train.json")
    if args.child:
        args.config, args.mode = args.config[0], args.mode[0]
        child(args)
        return 0
    jobs = PRESETS[args.preset] if args.preset else [(c, m, None) for c in args.config for m in args.mode]
    if args.sweep and not args.preset:
        jobs += [(c, m, t) for c in args.config for m in args.mode for t in (2, 5, 10, 20)]
    jobs = [(c, m, t, prec) for c, m, t in jobs for prec in (args.precision or [None])] * args.rounds
    rows = []
    for config, mode, terms, prec in jobs:
        extra = ["--config", config, "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--device", args.device] + (["--terms", str(terms)] if terms else []) \
                 + (["--batch", str(args.batch)] if args.batch else []) + (["--compile"] if args.compile else []) \
                 + (["--precision", prec] if prec else [])
        res = run_child(os.path.abspath(__file__), extra)
        row = {"config": config, "mode": mode, "terms": terms or "unbiased", **({"compile": True} if args.compile else {}),
               **({"precision": prec} if prec else {}), **res}
        rows.append(row)
        shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items() if k not in ("bug_report", "solver_iterations")}
        if row.get("solver_iterations"):  # per block in the JSON; here the mean and max over blocks
            its = list(row["solver_iterations"].values())
            shown["solve_iters"] = "fwd {:.1f}/{} adj {:.1f}/{}".format(
                sum(i["forward"] for i in its) / len(its), max(i["forward"] for i in its),
                sum(i["adjoint"] for i in its) / len(its), max(i["adjoint"] for i in its))
        print(table([shown], list(shown)), flush=True) if len(rows) == 1 else print("  ".join(str(v) for v in shown.values()), flush=True)
    report_failures(rows)
    cols = ["config", "mode", "terms"] + (["precision"] if args.precision else [])
    cols += ["median_s", "images_per_s", "baseline_rss_mb", "peak_rss_mb"]
    if any("cuda_peak_mb" in r for r in rows):
        cols.append("cuda_peak_mb")
    print()
    print(f"machine: {machine()}")
    print(table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows], cols + ["error"]),
          flush=True)
    write_results(args.json, {"machine": machine(), "steps": args.steps, "warmup": args.warmup, "results": rows})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "bench_train.py"))
