#!/usr/bin/env python
"""``make gpu-check``: the CUDA tests and the GPU benchmarks in one command, results in results/gpu.json.

    python benchmarks/gpu_check.py                 # everything (about 10 minutes on one GPU)
    python benchmarks/gpu_check.py --skip-bench    # the cuda-marked tests only

On a CUDA machine: (1) runs the ``cuda``-marked tests (tests/test_cuda.py: every gradient mode's outputs and
parameter gradients on CUDA against CPU float64, the linearised path, fixed-point inversion, train_img.py under
torchrun with NCCL on 2 GPUs if there are 2, else 1, and TF32 off by default) in a fresh process with
``CUDA_VISIBLE_DEVICES`` set (tests/conftest.py hides GPUs otherwise); (2) runs ``bench_train.py --device cuda``
for ``cifar10-b64`` (the paper's CIFAR-10 model at batch 64), ``idensenet-cifar10-b64`` (i-DenseNets'
CIFAR-10 model) and ``monotone-cifar10-b64`` (Monotone Flows' CIFAR-10 model, with the solvers' iteration counts per
block; each skipped with a message if this tree's bench_train.py does not have it), each in a fresh process
under a time limit, with ``--precision`` fp32, tf32 and bf16 and with ``--compile`` at fp32, reporting images/s,
``torch.cuda.max_memory_allocated``, the bits/dim of one fixed batch (initial weights, fixed probes) against fp32's
and, compiled, the compile time (graphs built, seconds, in the first step); (3) writes results/gpu.json.

Without CUDA it says so, runs the CUDA cases of the same test file (they skip: CI keeps the file importable and
its skip conditions working; its CPU self-checks run in ``make test``), and exits 0 unless that fails.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BENCH_CONFIGS = ("cifar10-b64", "idensenet-cifar10-b64", "monotone-cifar10-b64")
PRECISIONS = ("fp32", "tf32", "bf16")  # fp32 first: the others' fixed-batch bits/dim are compared with it


def run_tests(env: dict, timeout: int, extra=()) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs", "tests/test_cuda.py", *extra]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"ok": False, "error": f"timed out after {timeout} s", "output_tail": out[-4000:]}
    out = proc.stdout + proc.stderr
    print(proc.stdout[-6000:], flush=True)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", out.splitlines()[-1] if out else "")}
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "seconds": round(time.time() - t0, 1), **counts,
            "output_tail": out[-4000:]}


def known_configs() -> tuple:
    sys.path.insert(0, HERE)
    from common import CONFIGS  # noqa: E402

    return tuple(CONFIGS)


def run_bench(config: str, env: dict, timeout: int, steps: int, warmup: int, precision: str = "fp32",
              compiled: bool = False) -> dict:
    out_json = os.path.join(HERE, "results", f".gpu_{config}_{precision}{'_compiled' if compiled else ''}.json")
    cmd = [sys.executable, os.path.join(HERE, "bench_train.py"), "--config", config, "--device", "cuda",
           "--steps", str(steps), "--warmup", str(warmup), "--precision", precision, "--json", out_json] \
        + (["--compile"] if compiled else [])
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "precision": precision, "compile": compiled, "error": f"timed out after {timeout} s"}
    print(proc.stdout[-3000:], flush=True)
    try:
        with open(out_json) as f:
            rows = json.load(f)["results"]
        os.remove(out_json)
    except (OSError, ValueError, KeyError):
        return {"config": config, "precision": precision, "compile": compiled,
                "error": (proc.stderr.strip().splitlines() or ["no result"])[-1]}
    row = rows[0]
    keep = ("mode", "median_s", "images_per_s", "cuda_peak_mb", "fixed_batch_bpd", "first_step_s", "compile_s",
            "graphs", "solver_iterations", "error")
    return {"config": config, "precision": precision, "compile": compiled, **{k: row[k] for k in keep if k in row},
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    from common import OneLineArgumentParser, int_at_least

    p = OneLineArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-bench", action="store_true", help="run the cuda tests only")
    p.add_argument("--test-timeout", type=int_at_least(1), default=900, help="seconds for the cuda tests")
    p.add_argument("--bench-timeout", type=int_at_least(1), default=600, help="seconds per benchmark process")
    p.add_argument("--steps", type=int_at_least(1), default=10)
    p.add_argument("--warmup", type=int_at_least(0), default=3)
    p.add_argument("--json", default=os.path.join(HERE, "results", "gpu.json"))
    args = p.parse_args(argv)

    import torch

    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; running the CPU part only (the CUDA tests skip, no GPU benchmarks, "
              "no results/gpu.json)", flush=True)
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        res = run_tests(env, args.test_timeout, ["-k", "not host"])
        if not res["ok"]:
            print(res.get("output_tail", ""), file=sys.stderr)
            print(f"gpu-check: the CPU part of tests/test_cuda.py failed ({res.get('error', res.get('returncode'))})", file=sys.stderr)
            return 1
        print("gpu-check: CPU part passed; run `make gpu-check` on a CUDA machine for the real check")
        return 0

    n = torch.cuda.device_count()
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(i) for i in range(n))
    result = {"machine": f"{torch.cuda.get_device_name(0)} x{n}, torch {torch.__version__}, CUDA {torch.version.cuda}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpus": n}
    print(f"gpu-check on {result['machine']}", flush=True)
    result["tests"] = run_tests(env, args.test_timeout)
    result["bench"] = []
    if not args.skip_bench:
        configs = known_configs()
        for config in BENCH_CONFIGS:
            if config not in configs:
                msg = f"configuration {config!r} is not in benchmarks/common.py here (i-DenseNets not merged?); skipped"
                print(f"gpu-check: {msg}", flush=True)
                result["bench"].append({"config": config, "skipped": msg})
                continue
            rows = [run_bench(config, env, args.bench_timeout, args.steps, args.warmup, prec) for prec in PRECISIONS]
            for row in rows[1:]:
                if "fixed_batch_bpd" in row and "fixed_batch_bpd" in rows[0]:
                    row["fixed_batch_bpd_minus_fp32"] = row["fixed_batch_bpd"] - rows[0]["fixed_batch_bpd"]
            result["bench"].extend(rows)
            # --compile True at fp32 beside the eager fp32 row (compile time in the first step)
            result["bench"].append(run_bench(config, env, args.bench_timeout, args.steps, args.warmup, "fp32", True))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    t = result["tests"]
    print(f"\ntests: {'passed' if t['ok'] else 'FAILED'} ({', '.join(f'{t[k]} {k}' for k in ('passed', 'failed', 'skipped') if k in t)})")
    for b in result["bench"]:
        name = b["config"] + (" compiled" if b.get("compile") else " eager")
        if "images_per_s" in b:
            compile_s = f", compiled {b['graphs']} graphs in {b['compile_s']:.1f} s" if "compile_s" in b else ""
            delta = f", bits/dim vs fp32 {b['fixed_batch_bpd_minus_fp32']:+.5f}" if "fixed_batch_bpd_minus_fp32" in b else ""
            print(f"{name} {b.get('precision', '')}: {b['images_per_s']:.1f} images/s, step {b['median_s']:.3f} s, "
                  f"max_memory_allocated {b['cuda_peak_mb']:.0f} MB{delta}{compile_s}")
        else:
            print(f"{name}: {b.get('skipped') or b.get('error')}")
    print(f"wrote {args.json}")
    ok = t["ok"] and all("error" not in b for b in result["bench"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
