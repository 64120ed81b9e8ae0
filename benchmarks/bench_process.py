#!/usr/bin/env python
"""The whole-process measurement our performance targets were set with, of ``train_img.py``: time per training step and peak RSS.

    python benchmarks/bench_process.py                          # this tree, 3 rounds
    git archive f69516d | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python benchmarks/bench_process.py --baseline /tmp/before   # interleaved with an older tree
    python benchmarks/bench_process.py --precision fp32 bf16    # this tree, fp32 and bf16 interleaved

scikit-learn's 8x8 digits, upsampled to 28x28, are written in MNIST's file format twice: a training set of
4 batches and one of 20 batches (the same 297 test images each). ``train_img.py --data mnist --imagesize 28
--nblocks 2-2-2 --idim 64 --batchsize 64 --seed 1 --nworkers 0 --nepochs 1`` then runs on each, as a fresh
process, and the time per step is ``(T20 - T4) / 16``: start-up, model construction, the end-of-epoch
validation and the checkpoint cancel out. The peak RSS is the 20-step process's own (``ru_maxrss`` from ``wait4``).
With ``--baseline`` the trees alternate (baseline, this tree, ...) each round; figures are medians over rounds,
and ratios are taken per round. With ``--precision A B`` every tree runs with ``--precision A``, then ``B``,
each round (named ``TREE-A``, ...), and the ratio of the second to the first is reported. The EMA validation
of the 297 test images is timed from the run's log. The
1-minute load average is recorded with each round.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import BenchError, OneLineArgumentParser, check_json_path, int_at_least, run_main, write_results  # noqa: E402

FLAGS = ["--data", "mnist", "--imagesize", "28", "--nblocks", "2-2-2", "--idim", "64", "--batchsize", "64",
         "--seed", "1", "--nworkers", "0", "--nepochs", "1", "--print-freq", "1000", "--vis-freq", "100000"]
BATCH = 64


def write_mnist(root: str, n_train: int) -> None:
    """Digits at 28x28 in MNIST's idx format: ``n_train`` training images (cycled), the last 297 as test set."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray(np.clip(np.round(im * 255.0 / 16.0), 0, 255).astype(np.uint8))
                                .resize((28, 28), Image.BILINEAR)) for im in d.images])
    labels = d.target.astype(np.uint8)
    idx = np.arange(n_train) % 1500
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name, arr, magic in (("train-images-idx3-ubyte", imgs[idx], 2051), ("t10k-images-idx3-ubyte", imgs[1500:], 2051),
                             ("train-labels-idx1-ubyte", labels[idx], 2049), ("t10k-labels-idx1-ubyte", labels[1500:], 2049)):
        with open(os.path.join(raw, name), "wb") as f:
            f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes())


def run(tree: str, dataroot: str, save: str, timeout: int, extra=()) -> dict:
    """One ``train_img.py`` process: wall seconds and its own peak RSS in GB (``wait4``'s resource usage)."""
    shutil.rmtree(save, ignore_errors=True)
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(tree, "train_img.py"), *FLAGS, *extra, "--dataroot", dataroot,
                                 "--save", save], cwd=tree, stdout=subprocess.DEVNULL, stderr=err)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                raise BenchError(f"train_img.py in {tree} ran past --timeout {timeout} s; no results file was written")
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            last = (err.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            if proc.returncode == -9 or "out of memory" in last:
                last = "it ran out of memory (or was killed)" if proc.returncode == -9 else last
            raise BenchError(f"train_img.py in {tree} failed: {last}; no results file was written")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1024**2, "validation_s": validation_seconds(save)}


def validation_seconds(save: str):
    """The EMA validation's own time, from the run's log line ``... (297 images, 1.9 s)`` (None if absent)."""
    try:
        with open(os.path.join(save, "logs")) as f:
            found = re.findall(r"\((\d+) images, ([0-9.]+) s\)", f.read())
    except OSError:
        return None
    return float(found[-1][1]) if found else None


def cpu() -> dict:
    """The CPU's model name and its native bfloat16 / AMX flags (from /proc/cpuinfo)."""
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": name, "cpus": os.cpu_count(), "flags": {w: w in flags for w in wanted}}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="bench_process.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int_at_least(1), default=3)
    p.add_argument("--baseline", help="another source tree (e.g. an older commit unpacked with git archive)")
    p.add_argument("--timeout", type=int_at_least(1), default=1800, help="seconds per train_img.py process")
    p.add_argument("--precision", nargs="+", choices=["fp32", "tf32", "bf16"],
                   help="run every tree with each of these --precision values, interleaved")
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_process.json"),
                   help="results file, replaced only when every measurement succeeds")
    args = p.parse_args(argv)
    try:
        check_json_path(args.json)
    except BenchError as e:
        p.error(str(e))
    trees = {"this": REPO}
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "train_img.py")):
            p.error(f"--baseline {args.baseline}: no train_img.py there")
        trees = {"baseline": os.path.abspath(args.baseline), "this": REPO}
    variants = {name: (tree, ()) for name, tree in trees.items()}
    if args.precision:
        variants = {f"{name}-{prec}": (tree, ("--precision", prec)) for name, tree in trees.items() for prec in args.precision}
    work = tempfile.mkdtemp(prefix="bench_process_")
    try:
        roots = {n: os.path.join(work, f"data{n}") for n in (4, 20)}
        for n, root in roots.items():
            write_mnist(root, n * BATCH)
        rounds = []
        for r in range(args.rounds):
            res = {"load_1min": os.getloadavg()[0]}
            for name, (tree, extra) in variants.items():
                t20 = run(tree, roots[20], os.path.join(work, "save"), args.timeout, extra)
                t4 = run(tree, roots[4], os.path.join(work, "save"), args.timeout, extra)
                res[name] = {"step_s": (t20["wall_s"] - t4["wall_s"]) / 16, "wall_20_s": t20["wall_s"],
                             "wall_4_s": t4["wall_s"], "peak_rss_20_gb": t20["peak_rss_gb"],
                             "validation_s": t20["validation_s"]}
            rounds.append(res)
            print(json.dumps(res), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: {"step_s_median": statistics.median(r[name]["step_s"] for r in rounds),
                      "peak_rss_gb_median": statistics.median(r[name]["peak_rss_20_gb"] for r in rounds),
                      "validation_s_median": _median(r[name]["validation_s"] for r in rounds)} for name in variants}
    if args.baseline and not args.precision:
        summary["speedup_median"] = statistics.median(r["baseline"]["step_s"] / r["this"]["step_s"] for r in rounds)
    if args.precision and len(args.precision) == 2:
        a, b = (f"this-{prec}" for prec in args.precision)
        summary[f"step_ratio_{args.precision[1]}_over_{args.precision[0]}_median"] = statistics.median(
            r[b]["step_s"] / r[a]["step_s"] for r in rounds)
    print(json.dumps(summary))
    write_results(args.json, {"flags": FLAGS, "cpu": cpu(), "rounds": rounds, "summary": summary}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "bench_process.py"))
