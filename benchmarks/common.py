"""Shared pieces of the benchmarks: the paper's benchmark configurations, inputs, memory readings."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import traceback
from typing import Any, Callable, Dict, List

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from resflows import flags  # noqa: E402
from resflows.config import TrainConfig  # noqa: E402
from resflows.flags import OneLineArgumentParser  # noqa: E402,F401 - the scripts' parser

# Named configurations (train_img.py flags). "mnist" is the reference configuration of our performance targets, run on
# scikit-learn's digits upsampled to 28x28; "cifar10" is the paper's CIFAR-10 default at a small batch.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "mnist": dict(data="mnist", imagesize=28, nblocks="2-2-2", idim=64, batchsize=64),
    "cifar10": dict(data="cifar10", nblocks="16-16-16", idim=512, batchsize=4),
    "cifar10-b64": dict(data="cifar10", nblocks="16-16-16", idim=512, batchsize=64),
    # The i-DenseNets fork's CIFAR-10 command (Perugachi-Diaz et al. 2021): 4 on CPU, 64 (its batch) on a GPU.
    "idensenet-cifar10": dict(data="cifar10", nblocks="16-16-16", densenet=True, learnable_concat=True,
                              start_learnable_concat=25, act="CLipSwish", densenet_depth=3, densenet_growth=172, batchsize=4),
    "idensenet-cifar10-b64": dict(data="cifar10", nblocks="16-16-16", densenet=True, learnable_concat=True,
                                  start_learnable_concat=25, act="CLipSwish", densenet_depth=3, densenet_growth=172, batchsize=64),
    # The Monotone Flows fork's CIFAR-10 command (Ahn et al. 2022): monotone blocks, CPila, 10 exact terms.
    "monotone-cifar10": dict(data="cifar10", nblocks="16-16-16", densenet=True, learnable_concat=True, start_learnable_concat=25,
                             act="CPila", densenet_depth=3, densenet_growth=172, monotone_resolvent=True, n_exact_terms=10,
                             batchsize=4),
    "monotone-cifar10-b64": dict(data="cifar10", nblocks="16-16-16", densenet=True, learnable_concat=True, start_learnable_concat=25,
                                 act="CPila", densenet_depth=3, densenet_growth=172, monotone_resolvent=True, n_exact_terms=10,
                                 batchsize=64),
}
MODES = {
    "naive": dict(neumann_grad=False, mem_eff=False),
    "neumann": dict(neumann_grad=True, mem_eff=False),
    "mem-eff": dict(neumann_grad=False, mem_eff=True),
    "both": dict(neumann_grad=True, mem_eff=True),
}


def train_config(name: str, **overrides) -> TrainConfig:
    kw = dict(CONFIGS[name])
    kw.update(overrides)
    return TrainConfig(**kw)


def digits28(n: int, seed: int = 0) -> torch.Tensor:
    """scikit-learn's digits at 28x28 (bilinear, 8-bit), dequantised: the MNIST-shaped benchmark input."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray(np.clip(np.round(im * 255 / 16), 0, 255).astype(np.uint8))
                                .resize((28, 28), Image.BILINEAR)) for im in d.images])
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % len(imgs)
    x = torch.from_numpy(imgs[idx.numpy()]).float().unsqueeze(1)
    return (x + torch.rand(x.shape, generator=g)) / 256


def inputs_for(cfg: TrainConfig, n: int, seed: int = 0) -> torch.Tensor:
    if cfg.data == "mnist":
        # Cached, so that the measured processes do not import scikit-learn and Pillow (~75 MB of RSS).
        path = os.path.join(HERE, "results", f".digits28_{n}_{seed}.pt")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(digits28(n, seed), path)
        return torch.load(path, weights_only=True)
    size = cfg.imagesize or 32
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def bench_trainer(cfg: TrainConfig, device: torch.device):
    """A Trainer for ``cfg`` on one batch of benchmark inputs (ActNorm initialised on it, EMA, wrapped), built
    as train_img.py builds it; returns (trainer, x, y) for timing ``forward_backward`` + ``optimize``."""
    import tempfile

    from resflows.distributed import DistInfo
    from resflows.factory import model_config_from
    from resflows.loaders import tensor_data
    from resflows.model import ResidualFlow
    from resflows.trainer import Trainer

    model = ResidualFlow(model_config_from(cfg)).to(device)
    x = inputs_for(cfg, cfg.batchsize).to(device)
    y = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    trainer = Trainer(cfg, DistInfo(device=device), model, tempfile.mkdtemp(), data=tensor_data(x, y, cfg.batchsize))
    return trainer, x, y


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu} (native bf16: {', '.join(bf16) or 'none'}), {os.cpu_count()} CPUs, {dev}, torch {torch.__version__}"


def run_child(script: str, args: List[str], timeout: int = 3600) -> Dict[str, Any]:
    """Run one measurement in a fresh process (so its peak RSS is its own) and return its JSON line.

    A failed measurement returns ``{"error": its last stderr line}``; if the child died of a bug, the key
    ``"bug_report"`` holds its whole stderr (the traceback), which the caller shows.
    """
    try:
        proc = subprocess.run([sys.executable, script, "--child"] + args, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    return child_result(proc)


_OOM_SIGNS = ("MemoryError", "OutOfMemoryError", "out of memory", "out of GPU memory", "can't allocate memory", "Cannot allocate memory")


def child_result(proc: subprocess.CompletedProcess) -> Dict[str, Any]:
    """The JSON line a measuring child printed, or ``{"error": one line}``: a child that ran out of memory
    (a ``MemoryError``, CUDA's out-of-memory error, or killed by SIGKILL, as the kernel's OOM killer does)
    is reported as such; one that died of a bug also gets ``"bug_report"``, its whole stderr."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            return {"error": f"printed a malformed result line: {lines[-1][:80]}"}
    err = proc.stderr or ""
    last = (err.strip().splitlines() or [f"exited with status {proc.returncode} and no message"])[-1]
    if proc.returncode == -9 or any(sign in err for sign in _OOM_SIGNS):
        how = "was killed (SIGKILL, as the kernel does when memory runs out)" if proc.returncode == -9 else "ran out of memory"
        return {"error": f"the measurement {how}; use a smaller configuration or --batch"}
    out: Dict[str, Any] = {"error": " ".join(last.split())}
    if proc.returncode == EXIT_BUG or "Traceback" in err:
        out["bug_report"] = err
    return out


# ------------------------------------------------------------------------------------------------
# Flags and errors: a bad flag or a failed measurement is one line and a non-zero exit, and a results
# file is only ever replaced by a complete set of measurements.
# ------------------------------------------------------------------------------------------------
EXIT_BUG = 70  # an unexpected exception (a bug), as sysexits.h's EX_SOFTWARE


class BenchError(Exception):
    """A user error or a failed measurement: reported as one line, exit status 1."""


def int_at_least(low: int):
    """argparse type: an integer >= ``low``."""
    return flags.int_at_least(low, f"an integer >= {low}")


def check_device(device: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that exists here; else :class:`BenchError`."""
    if device in ("auto", "cpu"):
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BenchError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device
    raise BenchError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


def check_json_path(path: str) -> str:
    """The results file must be a writable file path (its folder is created); else :class:`BenchError`."""
    if os.path.isdir(path):
        raise BenchError(f"--json {path} is a folder; give a file name, e.g. {os.path.join(path, 'bench.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--json {path}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise BenchError(f"--json {path}: its folder {folder} is not writable")
    return path


def parse_bench_args(p: argparse.ArgumentParser, argv, results_name: str) -> argparse.Namespace:
    """Adds the flags every measuring script has (--device, --json defaulting to ``results/RESULTS_NAME``,
    the hidden --child), parses ``argv`` and checks the device and, in the parent process, the results path:
    a bad value is a one-line flag error."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", default=os.path.join(HERE, "results", results_name),
                   help="results file, replaced only when every measurement succeeds")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        check_device(args.device)
        if not args.child:
            check_json_path(args.json)
    except BenchError as e:
        p.error(str(e))
    return args


def write_results(path: str, record: Dict[str, Any], indent: int = 2) -> None:
    """Writes the results file atomically, and only if every measurement succeeded.

    A failed measurement raises :class:`BenchError` naming it, and the existing file (tracked results in
    ``benchmarks/results/``) is left as it was.
    """
    for row in record.get("results", record.get("runs", [])):
        if "error" in row:
            what = " ".join(f"{k} {row[k]}" for k in ("config", "mode", "terms", "method", "nblocks", "tree", "round")
                            if k in row)
            raise BenchError(f"measurement {what} failed: {row['error']}; {path} left unchanged")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=indent)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise BenchError(f"--json {path}: cannot write the results ({e.strerror or e})") from None


def run_main(main: Callable[[], int], prog: str) -> int:
    """Runs a benchmark's ``main`` and turns errors into one line: 1 for a :class:`BenchError` or an OSError,
    130 when interrupted, and for anything else (a bug) the traceback, a line saying so and :data:`EXIT_BUG`."""
    try:
        return main()
    except BenchError as e:
        _error(prog, str(e))
    except OSError as e:
        _error(prog, f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
    except torch.cuda.OutOfMemoryError:
        _error(prog, "out of GPU memory; use a smaller configuration or --batch")
    except MemoryError:
        _error(prog, "out of memory; use a smaller configuration or --batch")
    except KeyboardInterrupt:
        _error(prog, "interrupted; no results file was written")
        return 130
    except Exception:
        traceback.print_exc()
        _error(prog, "internal error (the traceback above); this is a bug in resflows, please report it with the "
                     "command you ran")
        return EXIT_BUG
    return 1


def _error(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
    sys.stderr.flush()


def report_failures(rows: List[Dict[str, Any]]) -> None:
    """Shows the traceback of every measurement that died of a bug (kept out of the table)."""
    for row in rows:
        report = row.pop("bug_report", None)
        if report:
            sys.stderr.write(report if report.endswith("\n") else report + "\n")


def table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(out)
