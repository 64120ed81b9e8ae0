#!/usr/bin/env python
"""Evaluation and sampling speed: test bits/dim throughput and fixed-point sampling throughput.

    python benchmarks/bench_eval.py --preset make        # what `make bench` runs
    python benchmarks/bench_eval.py --config mnist --images 297 --repeats 3

Test bits/dim runs exactly as ``train_img.py`` validates (EMA weights, power iterations re-run for them,
the evaluation estimator with 20 exact terms, batches of --val-batchsize) over ``--images`` images, and
reports images/s (median of --repeats runs). Sampling inverts z ~ N(0, I) through every block by fixed-point
iteration and reports images/s and the mean number of fixed-point iterations per residual block.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    CONFIGS,
    OneLineArgumentParser,
    inputs_for,
    int_at_least,
    machine,
    parse_bench_args,
    peak_rss_mb,
    report_failures,
    run_child,
    run_main,
    table,
    train_config,
    write_results,
)

PRESETS = {"make": [("mnist", 297, 64)], "quick": [("mnist", 297, 16)]}


def child(args) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from resflows.evaluation import evaluate, prepare_for_eval
    from resflows.factory import model_config_from
    from resflows.model import ResidualFlow
    from resflows.optim import EMA

    try:
        from resflows.runtime import tune_cpu_runtime
    except ImportError:  # an older resflows, measured for the before/after table
        tune_cpu_runtime = lambda: torch.set_flush_denormal(True)  # noqa: E731

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        tune_cpu_runtime()
    torch.manual_seed(0)
    cfg = train_config(args.config, seed=0)
    model = ResidualFlow(model_config_from(cfg)).to(device)
    model.check_values = False  # as the trainer: the inputs are valid images
    x = inputs_for(cfg, args.images)
    with torch.no_grad():
        model.train()
        model.transform(x[: cfg.batchsize].to(device))  # ActNorm initialisation
    ema = EMA(model)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=cfg.val_batchsize)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = evaluate(prepare_for_eval(ema.model), loader, cfg, device)  # as the trainer validates
        sync()
        times.append(time.perf_counter() - t0)
    val_s = statistics.median(times)

    ema = ema.model.eval()
    blocks = ema.iresblocks()
    s_times, iters = [], []
    for r in range(args.repeats):
        z = torch.randn(args.samples, ema.latent_dim, generator=torch.Generator().manual_seed(r)).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            ema.inverse(z)
        sync()
        s_times.append(time.perf_counter() - t0)
        iters.append(sum(b.last_inverse_iters for b in blocks) / len(blocks))
    samp_s = statistics.median(s_times)
    print(json.dumps({"val_images": len(x), "val_s": val_s, "val_images_per_s": len(x) / val_s, "test_bpd": res["test_bpd"],
                      "samples": args.samples, "sample_s": samp_s, "samples_per_s": args.samples / samp_s,
                      "fixed_point_iters_per_block": statistics.mean(iters), "peak_rss_mb": peak_rss_mb()}))


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="bench_eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--config", nargs="+", default=["mnist"], choices=sorted(CONFIGS))
    p.add_argument("--images", type=int_at_least(1), default=297, help="test images to evaluate")
    p.add_argument("--samples", type=int_at_least(1), default=64, help="samples to draw")
    p.add_argument("--repeats", type=int_at_least(1), default=3)
    args = parse_bench_args(p, argv, "bench_eval.json")
    if args.child:
        args.config = args.config[0]
        child(args)
        return 0
    jobs = PRESETS[args.preset] if args.preset else [(c, args.images, args.samples) for c in args.config]
    rows = []
    for config, images, samples in jobs:
        res = run_child(os.path.abspath(__file__), ["--config", config, "--images", str(images), "--samples", str(samples),
                                                     "--repeats", str(args.repeats), "--device", args.device])
        rows.append({"config": config, **res})
    report_failures(rows)
    print(f"machine: {machine()}")
    fmt = [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print(table(fmt, ["config", "val_images", "val_s", "val_images_per_s", "samples", "sample_s", "samples_per_s",
                      "fixed_point_iters_per_block", "peak_rss_mb", "error"]), flush=True)
    write_results(args.json, {"machine": machine(), "repeats": args.repeats, "results": rows})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "bench_eval.py"))
