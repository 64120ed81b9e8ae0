#!/usr/bin/env python
"""What is alive at the memory peak of one training step (reference configuration by default).

    python benchmarks/mem_profile.py [--config mnist] [--device cpu]

Builds the model and trainer as bench_train.py does, runs two warm-up steps, then profiles one full step
(forward, backward, clipping, optimiser step, Lipschitz and EMA updates) with torch.profiler's memory
timeline, which attributes every live allocation to a category (parameter, optimizer state, input,
activation, gradient, autograd detail, temporary). Prints the breakdown at the peak and the step's peak RSS;
writes results/mem_profile.json.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    CONFIGS,
    MODES,
    BenchError,
    OneLineArgumentParser,
    bench_trainer,
    check_device,
    check_json_path,
    machine,
    peak_rss_mb,
    rss_mb,
    run_main,
    train_config,
    write_results,
)


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="mem_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mnist", choices=sorted(CONFIGS))
    p.add_argument("--mode", default="both", choices=sorted(MODES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=os.path.join(HERE, "results", "mem_profile.json"),
                   help="results file, replaced only when the profile succeeds")
    args = p.parse_args(argv)
    try:
        args.device = check_device(args.device)
        check_json_path(args.json)
    except BenchError as e:
        p.error(str(e))
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    import torch
    from torch.profiler import profile

    from resflows.runtime import tune_cpu_runtime

    device = torch.device(args.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    torch.manual_seed(0)
    cfg = train_config(args.config, seed=0, **MODES[args.mode])
    trainer, x, y = bench_trainer(cfg, device)

    def step():
        trainer.forward_backward(x, y, sync=True, n_accum=1)
        trainer.optimize(1)

    for _ in range(2):
        step()
    base = rss_mb()
    with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    timeline = MemoryProfileTimeline(prof._memory_profile())
    times, sizes = timeline._coalesce_timeline(device)
    totals = [sum(s) for s in sizes]
    i = max(range(len(totals)), key=totals.__getitem__)
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX

    names = ["unknown"] + [c.name.lower() if c is not None else "unknown" for c in _CATEGORY_TO_INDEX]
    at_peak = {names[k]: round(v / 2**20, 1) for k, v in enumerate(sizes[i]) if v}
    out = {"machine": machine(), "config": args.config, "mode": args.mode, "peak_mb": round(totals[i] / 2**20, 1),
           "at_peak_mb": at_peak, "peak_at_fraction_of_step": round((times[i] - times[0]) / max(times[-1] - times[0], 1), 3),
           "rss_before_step_mb": round(base, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    write_results(args.json, out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "mem_profile.py"))
