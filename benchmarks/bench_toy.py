#!/usr/bin/env python
"""Time per iteration of ``train_toy.py``, optionally against an older source tree, interleaved.

    python benchmarks/bench_toy.py                                  # --nblocks 10 and 100, this tree
    git archive f69516d | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python benchmarks/bench_toy.py --baseline /tmp/before --rounds 3   # before/after ratios

Each measurement is a fresh process that builds ``train_toy.py``'s model from its command line
(``--data 8gaussians --nblocks N``, batch 500, the rest at their defaults) and times ``ToyTrainer.run_step``
(sampling, loss, backward, optimiser step, Lipschitz update): the median of ``--steps`` steps after
``--warmup``, as wall time and as the process's CPU time. With ``--baseline`` the two trees alternate
(baseline, this tree, baseline, ...) for ``--rounds`` rounds, and the ratio baseline / this tree is taken per
round, then the median. The 1-minute load average is recorded with every measurement: on a shared machine
compare ratios from one interleaved run, not absolute times; with ``--threads 1`` the CPU time is the
steadiest figure under load.
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


def load() -> float:
    return os.getloadavg()[0]


def child(args) -> None:
    import tempfile

    import torch

    sys.path.insert(0, args.tree)
    from resflows.toy import ToyTrainer, build_toy_model
    from resflows.toy.cli import parse_args

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # what train_toy.py does before building the model (older trees: denormals only)
        from resflows.toy.train import prepare_runtime
    except ImportError:
        prepare_runtime = lambda device: torch.set_flush_denormal(True)  # noqa: E731
    device = torch.device("cpu")
    prepare_runtime(device)
    cfg = parse_args(["--data", "8gaussians", "--nblocks", str(args.nblocks), "--test_batch_size", "10",
                      "--save", tempfile.mkdtemp()] + args.flags)
    torch.manual_seed(cfg.seed)
    trainer = ToyTrainer(cfg, build_toy_model(cfg), device, cfg.save)
    load0 = load()
    wall, cpu = [], []
    for _ in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.run_step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    wall, cpu = wall[args.warmup:], cpu[args.warmup:]
    print(json.dumps({"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "load": round((load0 + load()) / 2, 2),
                      "threads": torch.get_num_threads(), "resflows": sys.modules["resflows"].__file__}))


def measure(tree: str, nblocks: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tree", tree, "--nblocks", str(nblocks),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads or 0)]
    cmd += ["--flags=" + " ".join(args.flags)] if args.flags else []
    env = dict(os.environ, PYTHONPATH=tree)
    from common import child_result

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    return child_result(proc)


def _at_least(low: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {s!r}")
        return v
    return parse


def build_parser(cls=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = cls(prog="bench_toy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nblocks", type=_at_least(1), nargs="+", default=[10, 100])
    p.add_argument("--steps", type=_at_least(1), default=10)
    p.add_argument("--warmup", type=_at_least(0), default=3)
    p.add_argument("--rounds", type=_at_least(1), default=1)
    p.add_argument("--baseline", help="another source tree (e.g. an older commit unpacked with git archive)")
    p.add_argument("--threads", type=_at_least(0), default=None, help="torch.set_num_threads in the measured process")
    p.add_argument("--flags", type=lambda s: s.split(), default=[], help="extra train_toy.py flags, one string")
    p.add_argument("--timeout", type=_at_least(1), default=3600)
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_toy.json"),
                   help="results file, replaced only when every measurement succeeds")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", default=REPO, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--child" in argv:  # the measured process imports nothing from this tree before --tree's resflows
        args = build_parser().parse_args(argv)
        args.nblocks = args.nblocks[0]
        child(args)
        return 0
    sys.path.insert(0, HERE)
    from common import BenchError, OneLineArgumentParser, check_json_path, write_results

    p = build_parser(OneLineArgumentParser)
    args = p.parse_args(argv)
    try:
        check_json_path(args.json)
        if args.baseline and not os.path.isdir(os.path.join(args.baseline, "resflows")):
            raise BenchError(f"--baseline {args.baseline}: no resflows package there")
    except BenchError as e:
        p.error(str(e))
    trees = ([("baseline", os.path.abspath(args.baseline))] if args.baseline else []) + [("this tree", REPO)]
    runs = []
    for r in range(args.rounds):
        for nb in args.nblocks:
            for name, tree in trees:
                res = {"round": r, "nblocks": nb, "tree": name, **measure(tree, nb, args)}
                runs.append(res)
                print(json.dumps(res), flush=True)
    summary = []
    for nb in args.nblocks:
        row = {"nblocks": nb}
        for name, _ in trees:
            ok = [x for x in runs if x["nblocks"] == nb and x["tree"] == name and "wall_s" in x]
            if ok:
                row[name] = {k: statistics.median(x[k] for x in ok) for k in ("wall_s", "cpu_s", "load")}
        if args.baseline:
            for k in ("wall_s", "cpu_s"):
                ratios = [b[k] / a[k] for r in range(args.rounds)
                          for b in runs if b["round"] == r and b["nblocks"] == nb and b["tree"] == "baseline" and k in b
                          for a in runs if a["round"] == r and a["nblocks"] == nb and a["tree"] == "this tree" and k in a]
                if ratios:
                    row[f"speedup_{k[:-2]}"] = statistics.median(ratios)
        summary.append(row)
    print(json.dumps(summary, indent=1))
    write_results(args.json, {"argv": argv, "cpus": os.cpu_count(), "runs": runs, "summary": summary})
    print(f"wrote {args.json}")
    return 0


def _entry(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--child" in argv:
        return main(argv)
    sys.path.insert(0, HERE)
    from common import run_main

    return run_main(lambda: main(argv), "bench_toy.py")


if __name__ == "__main__":
    sys.exit(_entry())
