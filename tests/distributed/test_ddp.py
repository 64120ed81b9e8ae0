"""torchrun with 2 CPU processes (gloo) on the digits: identical state, same update as one process,
checkpoints that a single process resumes, and failures that end the run."""
import os
import subprocess
import sys

import pytest
import torch

from resflows import read_checkpoint
from tests.conftest import REPO

WORKER = REPO / "tests" / "distributed" / "worker.py"
TINY = ["--data", "digits", "--nblocks", "1-1", "--idim", "8", "--fc-idim", "16", "--nworkers", "0",
        "--print-freq", "1", "--vis-freq", "1000", "--seed", "3"]


def _env():
    return {**os.environ, "RESFLOWS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)


def single(args, timeout=240):
    return subprocess.run([sys.executable] + [str(a) for a in args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=REPO)


def test_ranks_hold_bitwise_identical_state(tmp_path):
    """After a few optimizer steps, parameters and buffers (power-iteration vectors, ActNorm, running
    means, estimator moments) are bitwise identical on both ranks."""
    proc = torchrun([WORKER, "state", tmp_path, "--"] + TINY + ["--batchsize", "40", "--max-iters", "4",
                    "--batchnorm", "True", "--save", tmp_path / "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 4
    for part in ("model", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)


def test_rank_seeds_never_collide_and_one_process_keeps_its_seed():
    """rank r of W processes seeds its streams with seed * W + r: no two (seed, rank) pairs share a stream at
    any world size (seed + r made seed 0 on rank 1 draw what seed 1 draws on rank 0), and W = 1 is the seed."""
    from resflows.distributed import rank_seed

    for world in (1, 2, 3, 8):
        seeds = [rank_seed(s, r, world) for s in range(40) for r in range(world)]
        assert len(set(seeds)) == len(seeds)
    assert [rank_seed(s, 0, 1) for s in range(5)] == list(range(5))
    assert rank_seed(0, 1, 2) != rank_seed(1, 0, 2)


def test_train_img_seeds_each_rank_by_rank_seed(tmp_path):
    """The seed each rank's streams start from in train_img.py: seed * 2 + rank under torchrun, the seed
    itself in one process (the streams of single-process runs are unchanged)."""
    args = TINY + ["--batchsize", "40", "--max-iters", "1"]
    proc = torchrun([WORKER, "state", tmp_path, "--"] + args + ["--save", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["rank_seed"] for r in (0, 1)] == [6, 7]  # --seed 3
    proc = single([WORKER, "state", tmp_path, "--"] + args + ["--save", tmp_path / "one"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "rank0.pt", weights_only=True)["rank_seed"] == 3


@pytest.mark.slow
def test_two_processes_make_the_same_update_as_one(tmp_path):
    """One step with global batch 2B on 2 ranks == one step with batch 2B on 1 process: truncated series,
    Hutchinson probes fixed per image, SGD (linear in the gradient)."""
    args = TINY + ["--batchsize", "32", "--max-iters", "1", "--n-power-series", "4", "--optimizer", "sgd",
                   "--lr", "0.5", "--warmup-iters", "1"]
    p2 = torchrun([WORKER, "equiv", tmp_path, "--"] + args + ["--save", tmp_path / "two"])
    assert p2.returncode == 0, p2.stderr[-3000:]
    two = torch.load(tmp_path / "rank0.pt", weights_only=True)
    os.remove(tmp_path / "rank0.pt")
    p1 = single([WORKER, "equiv", tmp_path, "--"] + args + ["--save", tmp_path / "one"])
    assert p1.returncode == 0, p1.stderr[-3000:]
    one = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for k, v in one["model"].items():
        if ".last_" in k:
            continue  # estimator moments of the local batch: rank 0 saw half of it
        assert torch.allclose(v.double(), two["model"][k].double(), rtol=1e-5, atol=1e-6), k
    # The step really changed the weights (so the comparison is not vacuous).
    assert any(not torch.equal(one["model"][k], one["ema"][k]) for k in one["model"] if k.endswith("weight"))


@pytest.mark.slow
def test_distributed_checkpoint_resumes_in_one_process_and_evaluates_under_torchrun(tmp_path):
    save = tmp_path / "run"
    p = torchrun([REPO / "train_img.py"] + TINY + ["--batchsize", "40", "--max-iters", "3", "--save", save])
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = read_checkpoint(str(save / "models" / "most_recent.pth"))
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and len(ckpt["rng"]["per_rank"]) == 2
    p = single([REPO / "train_img.py", "--resume", save / "models" / "most_recent.pth", "--max-iters", "5", "--nworkers", "0"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_checkpoint(str(save / "models" / "most_recent.pth"))["step"] == 5
    p = torchrun([REPO / "train_img.py", "--resume", save / "models" / "most_recent.pth", "--evaluate", "--nworkers", "0",
                  "--save", tmp_path / "eval"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(297 images)" in p.stdout  # every test image exactly once across the two ranks
    p = torchrun([REPO / "train_img.py", "--resume", save / "models" / "most_recent.pth", "--sample", "4",
                  "--save", tmp_path / "samples"])
    assert p.returncode == 0 and os.listdir(tmp_path / "samples" / "samples")


@pytest.mark.slow
def test_a_failing_rank_ends_the_run(tmp_path):
    p = torchrun([WORKER, "fail", tmp_path, "--"] + TINY + ["--batchsize", "40", "--max-iters", "50",
                 "--save", tmp_path / "run"], timeout=180)
    assert p.returncode != 0
    assert "injected failure on rank 1" in p.stderr


@pytest.mark.slow
def test_batch_not_divisible_by_world_size(tmp_path):
    p = torchrun([REPO / "train_img.py"] + TINY + ["--batchsize", "41", "--save", tmp_path / "run"], timeout=120)
    assert p.returncode != 0
    assert "--batchsize 41 is the global batch and must divide evenly over 2 ranks" in p.stderr


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_a_checkpoint(tmp_path):
    import signal
    import time

    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train_img.py")] \
        + TINY + ["--batchsize", "40", "--save", str(save)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    deadline = time.time() + 180
    for line in proc.stdout:
        if "step 3 " in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)  # what a cluster scheduler sends to the launcher
    out, _ = proc.communicate(timeout=180)
    ckpt = read_checkpoint(str(save / "models" / "most_recent.pth"))
    assert ckpt["step"] >= 3 and ckpt["world_size"] == 2
    assert "received SIGTERM" in out
