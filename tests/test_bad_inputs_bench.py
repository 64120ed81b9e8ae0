"""Bad flags and failed measurements in benchmarks/: one line, a non-zero exit, and the results files (tracked
in benchmarks/results/) never replaced by an error record.

Each test runs a copy of benchmarks/ in a temporary folder, so that its default results files, and not the
tracked ones, are the files that must stay unchanged.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple, Tuple

import pytest
import torch

from .conftest import REPO


@pytest.fixture
def bench_copy(tmp_path):
    dst = tmp_path / "benchmarks"
    dst.mkdir()
    for name in ("bench_eval.py", "bench_train.py", "common.py"):
        shutil.copy(REPO / "benchmarks" / name, dst / name)
    (dst / "results").mkdir()
    for name in ("bench_eval.json", "bench_train.json"):
        shutil.copy(REPO / "benchmarks" / "results" / name, dst / "results" / name)
    return dst


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(folder, script: str):
    """The copied script as a module (its HERE, and so its default --json, is the copy's)."""
    sys.path.insert(0, str(folder))
    try:
        sys.modules.pop("common", None)
        spec = importlib.util.spec_from_file_location(f"_bench_{script}", folder / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(folder))


def _run_in_process(folder, script: str, argv, capsys) -> Tuple[int, str]:
    module = _load(folder, script)
    run_main = getattr(module, "run_main", lambda main, prog: main())  # (absent before this test was written)
    try:
        status = run_main(lambda: module.main(argv), f"{script}.py")
    except SystemExit as e:  # argparse's exit for a bad flag
        status = e.code
    return status, capsys.readouterr().err


class Case(NamedTuple):
    script: str
    argv: Tuple[str, ...]
    status: int
    line: str  # regex for the one stderr line


CASES = {
    "eval --images 0": Case("bench_eval", ("--images", "0"), 2, r"argument --images: expected an integer >= 1, got '0'"),
    "eval --samples -3": Case("bench_eval", ("--samples", "-3"), 2, r"--samples: expected an integer >= 1, got '-3'"),
    "eval --repeats 0": Case("bench_eval", ("--repeats", "0"), 2, r"--repeats: expected an integer >= 1, got '0'"),
    "eval --config with no name": Case("bench_eval", ("--config",), 2, r"--config: expected at least one argument"),
    "eval --device tpu": Case("bench_eval", ("--device", "tpu"), 2, r"--device tpu: expected auto, cpu, cuda or cuda:N"),
    "eval --device cuda:7": Case("bench_eval", ("--device", "cuda:7"), 2, r"--device cuda:7: (no CUDA GPU|this machine)"),
    "eval --json a folder": Case("bench_eval", ("--json", "{tmp}"), 2, r"--json .* is a folder; give a file name"),
    "train --steps 0": Case("bench_train", ("--steps", "0"), 2, r"argument --steps: expected an integer >= 1, got '0'"),
    "train --warmup -1": Case("bench_train", ("--warmup", "-1"), 2, r"--warmup: expected an integer >= 0, got '-1'"),
    "train --batch 0": Case("bench_train", ("--batch", "0"), 2, r"--batch: expected an integer >= 1, got '0'"),
    "train --mode with no name": Case("bench_train", ("--mode",), 2, r"--mode: expected at least one argument"),
    "train --device cuda:x": Case("bench_train", ("--device", "cuda:x"), 2, r"--device cuda:x: expected auto, cpu"),
}


def _check_one_line(status: int, err: str, case: Case) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == case.status, err
    assert len(lines) == 1 and re.fullmatch(rf"{case.script}\.py: error: .*{case.line}.*", lines[0]), err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_flag_is_one_line_and_results_stay(name, bench_copy, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    before = _digest(bench_copy)
    # Measurements run in child processes; none may start for a bad flag.
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a measurement was started"))
    status, err = _run_in_process(bench_copy, case.script, [a.format(tmp=tmp_path) for a in case.argv], capsys)
    _check_one_line(status, err, case)
    assert _digest(bench_copy) == before


def test_bench_eval_images_0_as_a_command(bench_copy):
    """The reported command, as a user runs it: exit 2, one line, the results file untouched."""
    before = _digest(bench_copy)
    proc = subprocess.run([sys.executable, str(bench_copy / "bench_eval.py"), "--images", "0"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    _check_one_line(proc.returncode, proc.stderr, CASES["eval --images 0"])
    assert _digest(bench_copy) == before


@pytest.mark.parametrize("script", ["bench_eval", "bench_train"])
def test_failed_measurement_never_replaces_results(script, bench_copy, capsys):
    """A measurement that fails (here: the child reports an error) leaves the results file as it was and
    ends in one line naming the measurement, with exit status 1."""
    before = _digest(bench_copy)
    module = _load(bench_copy, script)
    module.run_child = lambda *a, **k: {"error": f"{script}.py: error: out of GPU memory; use a smaller configuration"}
    status = module.run_main(lambda: module.main([]), f"{script}.py")
    err = capsys.readouterr().err
    _check_one_line(status, err, Case(script, (), 1, r"measurement config mnist.* failed: .*out of GPU memory.*; "
                                                     r".*results/" + script + r"\.json left unchanged"))
    assert _digest(bench_copy) == before


def test_crashed_measurement_shows_its_traceback(bench_copy, capsys):
    """A child that died of a bug: its traceback is shown (it is a bug to report), the results stay."""
    before = _digest(bench_copy)
    module = _load(bench_copy, "bench_eval")
    report = "Traceback (most recent call last):\n  ...\nZeroDivisionError: x\nbench_eval.py: error: internal error\n"
    module.run_child = lambda *a, **k: {"error": "bench_eval.py: error: internal error", "bug_report": report}
    assert module.run_main(lambda: module.main([]), "bench_eval.py") == 1
    err = capsys.readouterr().err
    assert err.startswith(report) and err.splitlines()[-1].startswith("bench_eval.py: error: measurement config mnist")
    assert _digest(bench_copy) == before


def test_unexpected_error_is_reported_as_a_bug(bench_copy, capsys):
    module = _load(bench_copy, "bench_train")

    def broken():
        raise ZeroDivisionError("stand-in for a bug")

    assert module.run_main(broken, "bench_train.py") == 70  # EX_SOFTWARE
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert re.fullmatch(r"bench_train\.py: error: internal error .*this is a bug in resflows, please report it.*",
                        lines[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu(bench_copy, capsys):
    status, err = _run_in_process(bench_copy, "bench_train", ["--device", "cuda"], capsys)
    _check_one_line(status, err, Case("bench_train", (), 2, r"--device cuda: no CUDA GPU is available here"))


# -- every bench script: bad flags in one line; failed measurements and bad checkpoints leave the results ------------
@pytest.fixture
def all_bench_copy(tmp_path):
    dst = tmp_path / "benchmarks"
    shutil.copytree(REPO / "benchmarks", dst, ignore=shutil.ignore_patterns("__pycache__", ".digits28_*"))
    return dst


MORE_CASES = {
    "toy --steps 0": Case("bench_toy", ("--steps", "0"), 2, r"argument --steps: expected an integer >= 1, got '0'"),
    "toy --nblocks x": Case("bench_toy", ("--nblocks", "x"), 2, r"argument --nblocks: expected an integer >= 1, got 'x'"),
    "toy unknown flag": Case("bench_toy", ("--bogus",), 2, r"unrecognized arguments: --bogus"),
    "toy --baseline missing": Case("bench_toy", ("--baseline", "{tmp}/nowhere"), 2, r"--baseline .*nowhere: no resflows package"),
    "toy --json a folder": Case("bench_toy", ("--json", "{tmp}"), 2, r"--json .* is a folder"),
    "process --rounds 0": Case("bench_process", ("--rounds", "0"), 2, r"argument --rounds: expected an integer >= 1, got '0'"),
    "process unknown flag": Case("bench_process", ("--bogus",), 2, r"unrecognized arguments: --bogus"),
    "process --baseline missing": Case("bench_process", ("--baseline", "{tmp}/nowhere"), 2, r"no train_img.py there"),
    "mem_profile --config x": Case("mem_profile", ("--config", "x"), 2, r"argument --config: invalid choice: 'x'"),
    "mem_profile --device tpu": Case("mem_profile", ("--device", "tpu"), 2, r"--device tpu: expected auto, cpu, cuda or cuda:N"),
    "mem_profile unknown flag": Case("mem_profile", ("--bogus",), 2, r"unrecognized arguments: --bogus"),
    "inverse no checkpoint": Case("bench_inverse", (), 2, r"the following arguments are required: checkpoint"),
    "inverse --samples 0": Case("bench_inverse", ("x.pth", "--samples", "0"), 2, r"--samples: expected an integer >= 1"),
    "gpu_check --steps 0": Case("gpu_check", ("--steps", "0"), 2, r"argument --steps: expected an integer >= 1, got '0'"),
}


@pytest.mark.parametrize("name", list(MORE_CASES))
def test_bad_flag_of_every_script_is_one_line(name, all_bench_copy, tmp_path):
    case = MORE_CASES[name]
    before = _digest(all_bench_copy)
    proc = subprocess.run([sys.executable, str(all_bench_copy / f"{case.script}.py"), *[a.format(tmp=tmp_path) for a in case.argv]],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    _check_one_line(proc.returncode, proc.stderr, case)
    assert _digest(all_bench_copy) == before


def _run_script(folder, script, argv, tmp_path):
    return subprocess.run([sys.executable, str(folder / f"{script}.py"), *argv], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bench_toy_failed_measurement_keeps_results(all_bench_copy, tmp_path):
    """`--flags "--lr nan"`: the measured process refuses the flag; the results file stays, exit 1, one line."""
    before = _digest(all_bench_copy)
    proc = _run_script(all_bench_copy, "bench_toy", ["--nblocks", "2", "--steps", "1", "--warmup", "0", "--flags", "--lr nan"],
                       tmp_path)
    _check_one_line(proc.returncode, proc.stderr, Case("bench_toy", (), 1, r"measurement nblocks 2 .*failed: .*--lr must be a finite "
                                                                        r"number.*results/bench_toy\.json left unchanged"))
    assert _digest(all_bench_copy) == before


@pytest.mark.parametrize("what", ["missing", "random bytes", "empty"])
def test_bench_inverse_bad_checkpoint_keeps_results(what, all_bench_copy, tmp_path):
    path = tmp_path / "c.pth"
    if what != "missing":
        path.write_bytes(os.urandom(4000) if what == "random bytes" else b"")
    before = _digest(all_bench_copy)
    proc = _run_script(all_bench_copy, "bench_inverse", [str(path), "--rounds", "1", "--samples", "2"], tmp_path)
    _check_one_line(proc.returncode, proc.stderr, Case("bench_inverse", (), 1, r"c\.pth: .*bench_inverse\.json left unchanged"))
    assert _digest(all_bench_copy) == before


@pytest.mark.parametrize("returncode, stderr, expected", [
    (-9, "", r"killed \(SIGKILL"),
    (1, "Traceback (most recent call last):\n  ...\nMemoryError\n", r"ran out of memory"),
    (1, "bench_train.py: error: out of GPU memory; use a smaller configuration or --batch\n", r"ran out of memory"),
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", r"ran out of memory"),
])
def test_child_out_of_memory_is_not_a_bug(returncode, stderr, expected):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from common import child_result
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    res = child_result(subprocess.CompletedProcess([], returncode, "", stderr))
    assert re.search(expected, res["error"]) and "bug_report" not in res
    assert "\n" not in res["error"]
