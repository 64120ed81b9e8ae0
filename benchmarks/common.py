"""Shared pieces of the benchmarks: the paper's benchmark configurations, inputs, memory readings."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from typing import Any, Dict, List

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from resflows.config import TrainConfig  # noqa: E402

# Named configurations (train_img.py flags). "mnist" is the reference configuration, run on
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
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs, {dev}, torch {torch.__version__}"


def run_child(script: str, args: List[str], timeout: int = 3600) -> Dict[str, Any]:
    """Run one measurement in a fresh process (so its peak RSS is its own) and return its JSON line."""
    proc = subprocess.run([sys.executable, script, "--child"] + args, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(out)
