#!/usr/bin/env python
"""Eager against ``--compile True``: compile time, step time after warm-up, peak RSS, and when compiling pays off.

    python benchmarks/bench_compile.py                          # mnist (reference) and cifar10 (batch 4), 2 rounds
    python benchmarks/bench_compile.py --config mnist --rounds 3 --steps 10
    python benchmarks/bench_compile.py --config cifar10-b64 idensenet-cifar10-b64 --device cuda

Every measurement is one ``bench_train.py`` process (default gradient mode), eager and compiled interleaved
round by round, so that a change of machine load hits both. The first compiled process of each configuration
starts from an empty inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``): its first step is the cold compile
time; later compiled processes reuse that cache, as a resumed run does (``compile_s`` of those rows is the warm,
on-disk-cache compile time). ``payoff_steps`` = extra time of the compiled first step over the eager one, divided
by the time a compiled step saves: the run length after which compiling has paid for itself.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (  # noqa: E402
    CONFIGS,
    OneLineArgumentParser,
    int_at_least,
    machine,
    parse_bench_args,
    report_failures,
    run_child,
    run_main,
    table,
    write_results,
)


def summarise(config: str, rows) -> dict:
    eager = [r for r in rows if not r.get("compile") and "median_s" in r]
    comp = [r for r in rows if r.get("compile") and "median_s" in r]
    if not eager or not comp:
        return {"config": config, "error": "a measurement failed"}
    e_step = statistics.median(r["median_s"] for r in eager)
    c_step = statistics.median(r["median_s"] for r in comp)
    cold = comp[0]
    warm = comp[1:]
    extra = cold["first_step_s"] - statistics.median(r["first_step_s"] for r in eager)
    saved = e_step - c_step
    return {
        "config": config,
        "eager_step_s": e_step,
        "compiled_step_s": c_step,
        "ratio": c_step / e_step,
        "cold_compile_s": cold.get("compile_s"),
        "warm_compile_s": statistics.median(r["compile_s"] for r in warm) if warm else None,
        "graphs": cold.get("graphs"),
        "eager_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in eager),
        "compiled_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in comp),
        "payoff_steps": (extra / saved) if saved > 0 else None,
    }


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="bench_compile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["mnist", "cifar10"], choices=sorted(CONFIGS))
    p.add_argument("--rounds", type=int_at_least(1), default=2, help="interleaved eager/compiled pairs per configuration")
    p.add_argument("--steps", type=int_at_least(1), default=5)
    p.add_argument("--warmup", type=int_at_least(1), default=2)
    p.add_argument("--timeout", type=int_at_least(1), default=3600, help="seconds per measurement process")
    args = parse_bench_args(p, argv, "bench_compile.json")
    script = os.path.join(HERE, "bench_train.py")
    rows, summary = [], []
    for config in args.config:
        cache = tempfile.mkdtemp(prefix="inductor-cache-")  # cold for the first compiled process, warm after
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        mine = []
        for rnd in range(args.rounds):
            for compiled in (False, True):
                extra = ["--config", config, "--mode", "both", "--steps", str(args.steps), "--warmup", str(args.warmup),
                         "--device", args.device] + (["--compile"] if compiled else [])
                res = run_child(script, extra, timeout=args.timeout)
                row = {"config": config, "round": rnd, "compile": compiled, **res}
                shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items() if k != "bug_report"}
                print("  ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
                mine.append(row)
        rows += mine
        summary.append(summarise(config, mine))
    report_failures(rows)
    print()
    print(f"machine: {machine()}")
    cols = ["config", "eager_step_s", "compiled_step_s", "ratio", "cold_compile_s", "warm_compile_s", "graphs",
            "eager_peak_rss_mb", "compiled_peak_rss_mb", "payoff_steps"]
    print(table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in summary], cols + ["error"]))
    write_results(args.json, {"machine": machine(), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                              "summary": summary, "results": rows})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "bench_compile.py"))
