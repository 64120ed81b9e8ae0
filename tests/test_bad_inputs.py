"""Every bad input to the entry points ends in one line, and nothing is lost (the preprocessing scripts' bad
inputs: tests/preprocessing/test_bad_inputs.py).

One table: the command (with the file set-up or fault it needs), the exit code, the one line it prints
(a regex), and the files that must be unchanged (or gone) afterwards. Cases run in-process through
``main(argv)``; a few tests below use subprocesses where a real process matters (tracebacks, a killed
lock holder).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import typing
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest
import torch

import train_img
import train_toy
from tests.conftest import REPO
from tests.helpers import TINY

TOY = ["--nblocks", "1", "--dims", "8", "--niters", "2", "--batch_size", "20", "--test_batch_size", "20",
       "--viz_npts", "4", "--viz_samples", "4", "--viz_freq", "1000", "--val_freq", "1", "--seed", "1"]
CKPT = "{run}/models/most_recent.pth"


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step digits run (models/most_recent.pth at step 2), copied afresh into each case."""
    os.environ["RESFLOWS_OFFLINE"] = "1"
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train_img.main(TINY + ["--max-iters", "2", "--save", str(run)]) == 0
    return run


# -- set-ups that craft files ----------------------------------------------------------------------------------
def _edit_checkpoint(name: str, edit: Callable[[dict], None]):
    def setup(tmp, run, monkeypatch):
        ckpt = torch.load(run / "models" / "most_recent.pth", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, tmp / name)
    return setup


def _set_config(**values):
    def edit(ckpt):
        ckpt["config"].update(values)
        for k, v in values.items():
            if k in ckpt["model_config"]:
                ckpt["model_config"][k] = v
    return edit


def _nan_weight(key: str):
    def edit(ckpt):
        t = next(iter(ckpt[key].values()))
        t.view(-1)[0] = float("nan")
    return edit


def _small_pth_dataset(tmp, run, monkeypatch):
    folder = tmp / "data" / "imagenet32"
    folder.mkdir(parents=True)
    images = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8)
    torch.save(images, folder / "train_32x32.pth")
    torch.save(images, folder / "valid_32x32.pth")


def _paper_pickle(tmp, run, monkeypatch):
    """A ~200-byte legacy-format torch pickle: default paper flags, no weights."""
    magic = 0x1950A86A20F9469CFC6C
    body = {"args": argparse.Namespace(data="cifar10"), "state_dict": {}}
    with open(tmp / "paper.pth", "wb") as f:
        for part in (magic, 1001, {"protocol_version": 1001}, body, []):
            pickle.dump(part, f, protocol=2)


def _full_disk(tmp, run, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)


def _nan_ema_after_step(tmp, run, monkeypatch):
    from resflows.optim import EMA

    update = EMA.update

    def poisoned(self, model):
        update(self, model)
        next(self.model.parameters()).data.fill_(float("nan"))
    monkeypatch.setattr(EMA, "update", poisoned)


def _nan_eval(tmp, run, monkeypatch):
    from resflows import evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: {"n_images": 297, "seconds": 0.1,
                                                                 "test_bpd": float("nan"), "test_bpd_stderr": float("nan")})


def _nan_inverse(tmp, run, monkeypatch):
    from resflows.model import ResidualFlow

    inverse = ResidualFlow.inverse
    monkeypatch.setattr(ResidualFlow, "inverse", lambda self, z, *a, **k: inverse(self, z, *a, **k) * float("nan"))


def _leftovers(tmp, run, monkeypatch):
    shutil.copy(run / "models" / "most_recent.pth", run / "models" / "checkpt-0099.pth")
    (run / "models" / ".tmp-killed.pth").write_bytes(b"half a checkpoint")


def _toy_leftover(tmp, run, monkeypatch):
    (tmp / "toy").mkdir()
    (tmp / "toy" / ".tmp-killed.pth").write_bytes(b"half a checkpoint")


def _locked(folder: str):
    """Another run holds the folder: its flock on SAVE/.lock, with its PID in the file."""
    def setup(tmp, run, monkeypatch):
        import fcntl

        path = tmp / folder
        path.mkdir(exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"424242 otherhost\n")
        return lambda: os.close(fd)
    return setup


def _toy_nan_step(tmp, run, monkeypatch):
    from resflows.toy import ToyTrainer

    step = ToyTrainer.run_step

    def poisoned(self):
        out = step(self)
        next(self.model.parameters()).data.fill_(float("inf"))
        return out
    monkeypatch.setattr(ToyTrainer, "run_step", poisoned)


# -- the table -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: Sequence[str]
    code: int
    line: str  # regex searched in the single line on stderr (None: the command succeeds)
    unchanged: Sequence[str] = ("run/models/*",)  # globs under the case folder
    gone: Sequence[str] = ()  # files that must not exist afterwards
    setup: Optional[Callable] = None
    script: str = "img"
    stdout: Optional[str] = None  # regex on stdout for successful cases


R = ["--resume", CKPT, "--nworkers", "0"]
# Resuming a damaged checkpoint written by the case's set-up into a fresh folder.
RESUME_C = ["--resume", "{tmp}/c.pth", "--nworkers", "0", "--max-iters", "3", "--save", "{tmp}/new"]
CASES = [
    # 1. sampling flags never fall through to resuming training in the checkpoint's folder
    Case("sample-0", R + ["--sample", "0"], 2, r"--sample 0 writes no samples"),
    Case("temp-without-sample", R + ["--temp", "0.5"], 2, r"--temp only applies when sampling"),
    Case("nrow-without-sample", R + ["--nrow", "4"], 2, r"--nrow only applies when sampling"),
    # 2. non-finite weights are never saved, evaluated or written to eval.json
    Case("lr-inf", TINY + ["--lr", "inf", "--warmup-iters", "0", "--max-iters", "1", "--save", "{tmp}/new"], 2,
         r"--lr must be a finite number in \(0, 10\]", gone=["new/models/most_recent.pth"]),
    Case("ema-becomes-nan", R + ["--max-iters", "3"], 1, r"weights became non-finite at step 3 .*refusing to save",
         setup=_nan_ema_after_step, gone=["run/models/.tmp-*"]),
    Case("evaluate-nan-weights", ["--resume", "{tmp}/nan.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"nan.pth: its model weights hold NaN or infinite values", setup=_edit_checkpoint("nan.pth", _nan_weight("model")),
         gone=["eval/eval.json"]),
    Case("evaluate-nan-ema", ["--resume", "{tmp}/nan.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"nan.pth: its EMA weights hold NaN or infinite values", setup=_edit_checkpoint("nan.pth", _nan_weight("ema")),
         gone=["eval/eval.json"]),
    Case("evaluate-nan-result", R + ["--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1, r"gave non-finite results",
         setup=_nan_eval,
         gone=["eval/eval.json"]),
    Case("toy-lr-inf", TOY + ["--lr", "inf", "--save", "{tmp}/toy"], 2, r"--lr must be a finite number", script="toy",
         gone=["toy/checkpt.pth", "toy/last.pth"]),
    Case("toy-weights-become-inf", TOY + ["--save", "{tmp}/toy"], 1, r"refusing to write .*toy/(checkpt|last).pth: .* NaN or infinite",
         script="toy", setup=_toy_nan_step, gone=["toy/last.pth", "toy/.tmp-*"]),
    # 3. every numeric flag's range, the device, the data, the disk
    Case("lr-nan", TINY + ["--lr", "nan", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--lr must be a finite number"),
    Case("lr-1e39", TINY + ["--lr", "1e39", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--lr must be .* got 1e\+39"),
    Case("imagesize-12-digits", TINY + ["--imagesize", "12", "--max-iters", "1", "--save", "{tmp}/new"], 2,
         r"--imagesize for digits must be a multiple of 8"),
    Case("nbits-0", TINY + ["--nbits", "0", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--nbits must be an integer in \[1, 8\]"),
    Case("nbits-minus-1", TINY + ["--nbits", "-1", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--nbits must be"),
    Case("nbits-9", TINY + ["--nbits", "9", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--nbits .*8 bits per channel"),
    Case("sample-minus-5", R + ["--sample", "-5"], 2, r"--sample must be an integer >= 0"),
    Case("nrow-minus-3", R + ["--sample", "4", "--nrow", "-3"], 2, r"--nrow must be an integer >= 1"),
    Case("padding-minus-1", TINY + ["--padding", "-1", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--padding must be an integer >= 0"),
    Case("idim-0", TINY + ["--idim", "0", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--idim must be an integer >= 1"),
    Case("coeff-1.5", TINY + ["--coeff", "1.5", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--coeff must be .*\(0, 1\)"),
    Case("coeff-1", TINY + ["--coeff", "1", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--coeff .*invertible"),
    Case("max-iters-0", TINY + ["--max-iters", "0", "--save", "{tmp}/new"], 2, r"--max-iters must be an integer >= 1"),
    Case("device-cuda-no-gpu", TINY + ["--device", "cuda", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--device cuda: no CUDA GPU"),
    Case("device-tpu", TINY + ["--device", "tpu", "--max-iters", "1", "--save", "{tmp}/new"], 2, r"--device must be auto, cpu, cuda"),
    Case("pth-wrong-image-size", TINY[2:] + ["--data", "imagenet32", "--dataroot", "{tmp}/data", "--max-iters", "1",
                                             "--save", "{tmp}/new"], 1,
         r"_32x32.pth holds 3x16x16 images, but --data imagenet32 needs 3x32x32", setup=_small_pth_dataset),
    Case("disk-full", R + ["--max-iters", "3"], 1, r"most_recent.pth: No space left on device \(the disk is full",
         setup=_full_disk, gone=["run/models/.tmp-*"]),
    # 4. crafted or damaged checkpoints fail fast, before a model is built from them
    Case("ckpt-million-blocks", ["--resume", "{tmp}/c.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"ask for 200000\d blocks but it holds only \d+ weight tensors",
         setup=_edit_checkpoint("c.pth", _set_config(nblocks="1000000-1000000"))),
    Case("ckpt-huge-idim", ["--resume", "{tmp}/c.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"weights do not fit this architecture .*wrong shape", setup=_edit_checkpoint("c.pth", _set_config(idim=10**7))),
    Case("paper-pickle-200-bytes", ["--resume", "{tmp}/paper.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"paper.pth: its settings ask for \d+ blocks but it holds only 0 weight tensors", setup=_paper_pickle),
    Case("ckpt-print-freq-0", RESUME_C, 1,
         r"c.pth: its stored settings are invalid: --print-freq must be an integer >= 1, got 0",
         setup=_edit_checkpoint("c.pth", _set_config(print_freq=0))),
    Case("ckpt-lr-string", RESUME_C, 1, r"--lr must be a number, got 'abc'",
         setup=_edit_checkpoint("c.pth", _set_config(lr="abc"))),
    Case("ckpt-config-not-dict", RESUME_C, 1, r"its 'config' is a list, not a dict",
         setup=_edit_checkpoint("c.pth", lambda c: c.update(config=[1, 2]))),
    Case("ckpt-bad-rng", RESUME_C, 1, r"random-number state cannot be restored",
         setup=_edit_checkpoint("c.pth", lambda c: c.update(rng={"torch": torch.zeros(3, dtype=torch.uint8)}))),
    Case("ckpt-bad-counter", RESUME_C, 1, r"its epoch counter is 'x'",
         setup=_edit_checkpoint("c.pth", lambda c: c.update(epoch="x"))),
    Case("ckpt-bad-best-list", RESUME_C, 1,
         r"list of best checkpoints is malformed", setup=_edit_checkpoint("c.pth", lambda c: c.update(best=[["x"]]))),
    # 6. leftovers, finished runs, non-finite sampling
    Case("leftovers-cleaned", R + ["--max-iters", "3"], 0, None, unchanged=(),
         gone=["run/models/checkpt-0099.pth", "run/models/.tmp-killed.pth"], setup=_leftovers),
    Case("resume-finished-run", R + ["--max-iters", "2"], 0, None, stdout=r"already reached --max-iters 2 \(step 2\); nothing to do"),
    Case("temp-nan", R + ["--sample", "4", "--temp", "nan"], 2, r"--temp must be a finite number > 0", gone=["run/samples"]),
    Case("temp-inf", R + ["--sample", "4", "--temp", "inf"], 2, r"--temp must be a finite number > 0", gone=["run/samples"]),
    Case("inverse-non-finite", R + ["--sample", "4"], 1, r"sampling at --temp 1 gave non-finite images", setup=_nan_inverse,
         gone=["run/samples/*.png"]),
    Case("toy-leftover-tmp", TOY + ["--save", "{tmp}/toy"], 0, None, unchanged=(), gone=["toy/.tmp-killed.pth"],
         script="toy", setup=_toy_leftover),
    # 8. one run per --save folder
    Case("save-folder-in-use", R + ["--max-iters", "3"], 1, r"--save .*run is in use by another run \(PID 424242 on otherhost\)",
         setup=_locked("run")),
    Case("toy-save-folder-in-use", TOY + ["--save", "{tmp}/toy"], 1, r"--save .*toy is in use by another run", script="toy",
         setup=_locked("toy"), unchanged=("toy/*",)),
]


def _digest(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


class _Timeout(Exception):
    pass


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    release = case.setup(tmp_path, run, monkeypatch) if case.setup else None
    argv = [a.format(run=run, tmp=tmp_path) for a in case.argv]
    before = _digest(p for g in case.unchanged for p in tmp_path.glob(g))
    main = train_img.main if case.script == "img" else train_toy.main

    def alarm(signum, frame):  # a case that hangs (as some did before the fix) fails instead
        raise _Timeout(f"{case.id} did not finish in time")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(os.environ.get("BAD_INPUT_TIMEOUT", "300")))
    try:
        _check_case(case, main, argv, tmp_path, before, capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if release:
            release()


def _check_case(case: Case, main, argv, tmp_path, before, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == case.code, err
    if case.line is None:
        assert not lines, err
    else:
        assert len(lines) == 1, err
        assert "Traceback" not in err
        assert re.search(case.line, lines[0]), lines[0]
    if case.stdout:
        assert re.search(case.stdout, out), out
    after = _digest(p for g in case.unchanged for p in tmp_path.glob(g))
    assert after == before
    for g in case.gone:
        assert not list(tmp_path.glob(g)), g


# -- the rules cover every flag ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["train", "model", "toy"])
def test_every_numeric_field_has_a_range(which):
    """A new numeric flag needs a rule in the table next to its config (or it would go unchecked)."""
    from resflows.config import MODEL_RULES, TRAIN_RULES, ModelConfig, TrainConfig
    from resflows.toy.config import TOY_RULES, ToyConfig

    cls, rules = {"train": (TrainConfig, TRAIN_RULES), "model": (ModelConfig, MODEL_RULES), "toy": (ToyConfig, TOY_RULES)}[which]
    exempt = {"vnorms"}  # orders 1..9 or infinity, checked by parse_vnorms
    hints = typing.get_type_hints(cls)
    numeric = []
    for f in dataclasses.fields(cls):
        h = hints[f.name]
        args = typing.get_args(h)
        if h in (int, float) or any(a in (int, float) for a in args):
            numeric.append(f.name)
    assert [n for n in numeric if n not in rules and n not in exempt] == []


# -- the lock ------------------------------------------------------------------------------------------------------
def test_lock_released_on_exit_and_after_errors(tmp_path):
    from resflows.entry import SaveLock

    save = tmp_path / "run"
    assert train_img.main(TINY + ["--max-iters", "1", "--save", str(save)]) == 0
    with pytest.raises(SystemExit):
        train_img.main(TINY + ["--lr", "nan", "--save", str(save)])
    SaveLock(str(save)).acquire().release()  # free again


def test_lock_of_a_killed_run_is_not_held(tmp_path):
    """SIGKILL gives no chance to clean up: the kernel drops the flock, so the folder is usable at once."""
    from resflows.entry import SaveLock

    code = ("import sys, time; from resflows.entry import SaveLock; SaveLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert p.stdout.readline().strip() == "locked"
        from resflows.config import ConfigError

        with pytest.raises(ConfigError, match=rf"in use by another run \(PID {p.pid} "):
            SaveLock(str(tmp_path)).acquire()
    finally:
        p.kill()
        p.wait()
    assert (tmp_path / ".lock").exists()  # the stale file stays...
    SaveLock(str(tmp_path)).acquire().release()  # ...and does not block


# -- tracebacks only for bugs --------------------------------------------------------------------------------------
def test_internal_error_prints_traceback_and_asks_for_a_report(tmp_path, monkeypatch, capsys):
    from resflows.entry import SaveLock
    from resflows.trainer import Trainer

    def broken(self):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(Trainer, "fit", broken)
    code = train_img.main(TINY + ["--max-iters", "1", "--save", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert re.search(r"internal error \(ZeroDivisionError\): this is a bug in resflows; please report it", err.strip().splitlines()[-1])
    SaveLock(str(tmp_path / "run")).acquire().release()  # released although the run crashed


@pytest.mark.parametrize("script, argv", [
    ("train_img.py", ["--lr", "nan"]),
    ("train_img.py", ["--resume", "missing.pth", "--evaluate"]),
    ("train_toy.py", ["--lr", "inf"]),
])
def test_scripts_end_in_one_line(tmp_path, script, argv):
    """The real scripts, as a user runs them: one line on stderr, no traceback."""
    p = subprocess.run([sys.executable, str(REPO / script)] + argv + ["--save", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "RESFLOWS_OFFLINE": "1"})
    assert p.returncode in (1, 2)
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"{script}: error: ")


# -- checkpoints, resume and the clean-up: crafted files, escapes from the run folder ------------------------------
# The clean-up removes only files directly in SAVE/models that this run's naming scheme produces, found by name;
# nothing outside the run folder is ever touched, and a refused checkpoint leaves the folder as it was.
ELSEWHERE = ("elsewhere/*",)  # a folder beside the run, which no case may change
# Epoch 6 (after 5 finished ones, which the crafted best lists name), with 30 batches of 50 digits an epoch:
# the next step ends it, so the resumed run validates and saves a new best, checkpt-0006.pth.
EPOCH_END = dict(epoch=6, batch_in_epoch=29, itr=29, step=29)


def _outside_files(tmp):
    (tmp / "elsewhere").mkdir(exist_ok=True)
    for name in ("thesis.tex", "abs.txt", "linked.tex"):
        (tmp / "elsewhere" / name).write_text(f"{name}: not a checkpoint\n")


def _best_list(entries):
    """A checkpoint edit: counters at the end of epoch 0 (so the resumed run validates and saves a new best,
    displacing the worst entry of ``entries``), and ``entries`` as its list of best files."""
    def edit(ckpt):
        ckpt.update(EPOCH_END, best=[list(e) for e in entries], best_test_bpd=entries[0][0])
    return edit


def _edit_in_place(path, edit) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def _escaping_best_list(escape: str):
    """The run's own checkpoint lists, as its worst best file (the one a new best displaces), a path outside
    the folder: through '..', absolute, or through a symlinked folder inside models/. models/ also holds
    symlinks with checkpoint names pointing outside (one listed, one a stale name)."""
    def setup(tmp, run, monkeypatch):
        _outside_files(tmp)
        models = run / "models"
        (models / "out").symlink_to(tmp / "elsewhere", target_is_directory=True)
        (models / "checkpt-0003.pth").symlink_to(tmp / "elsewhere" / "linked.tex")
        (models / "checkpt-0009.pth").symlink_to(tmp / "elsewhere" / "linked.tex")
        shutil.copy(models / "most_recent.pth", models / "checkpt-0005.pth")
        path = {"dotdot": str(models) + "/../../elsewhere/thesis.tex", "absolute": str(tmp / "elsewhere" / "abs.txt"),
                "symlinked-folder": str(models / "out" / "thesis.tex"), "symlink": str(models / "checkpt-0003.pth")}[escape]
        entries = [(1e6, 1, "x"), (1e6, 2, "/"), (1e6, 3, str(models / "checkpt-0003.pth")), (1e6, 4, ".."), (2e6, 5, path)]
        _edit_in_place(models / "most_recent.pth", _best_list(entries))
    return setup


def _other_run_best(tmp, run, monkeypatch):
    """run/models holds its 5 best files, listed (by path) in its most_recent.pth."""
    models = run / "models"
    entries = []
    for e in range(1, 6):
        shutil.copy(models / "most_recent.pth", models / f"checkpt-{e:04d}.pth")
        entries.append((1e6, e, str(models / f"checkpt-{e:04d}.pth")))
    _edit_in_place(models / "most_recent.pth", _best_list(entries))


def _copied_run(tmp, run, monkeypatch):
    """A copy of a run folder whose checkpoint lists the original's files by path."""
    _other_run_best(tmp, run, monkeypatch)
    shutil.copytree(run, tmp / "copy")


def _flip_byte(src: str = "run/models/most_recent.pth", name: str = "c.pth"):
    """A copy of a checkpoint with one byte flipped inside its largest tensor storage (a weight)."""
    def setup(tmp, run, monkeypatch):
        import zipfile

        data = bytearray((tmp / src).read_bytes())
        with zipfile.ZipFile(tmp / src) as zf:
            info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
            assert "/data/" in info.filename
        head = info.header_offset
        start = head + 30 + int.from_bytes(data[head + 26:head + 28], "little") + int.from_bytes(data[head + 28:head + 30], "little")
        data[start + info.file_size // 2] ^= 0x01
        (tmp / name).write_bytes(bytes(data))
    return setup


def _zip_bomb(name: str = "c.pth"):
    """A 100 KB zip whose one deflated entry inflates to 100 MiB."""
    def setup(tmp, run, monkeypatch):
        import zipfile

        with zipfile.ZipFile(tmp / name, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
            zf.writestr("archive/data/0", bytes(100 << 20))
    return setup


def _deep(kind: str, n: int = 200_000) -> bytes:
    """Pickle opcodes of ``n`` nested lists or dicts (which pickle itself cannot write: it recurses)."""
    if kind == "list":
        return b"]" * n + b"a" * (n - 1)
    return (b"}X\x01\x00\x00\x00k" * (n - 1)) + b"}" + b"s" * (n - 1)


SENTINEL = "DEEP-NESTING-GOES-HERE"


def _with_deep(data: bytes, kind: str) -> bytes:
    token = b"X" + len(SENTINEL).to_bytes(4, "little") + SENTINEL.encode()
    assert data.count(token) == 1
    return data.replace(token, _deep(kind))


def _deep_checkpoint(where: str, kind: str, name: str = "c.pth"):
    """Our checkpoint with a 200,000-deep nested value at ``where`` (``model_config.nblocks``, ...)."""
    def setup(tmp, run, monkeypatch):
        import io
        import zipfile

        ckpt = torch.load(run / "models" / "most_recent.pth", weights_only=True)
        section, key = where.split(".")
        ckpt[section][key] = SENTINEL
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(tmp / name, "w") as zout:
            for info in zin.infolist():
                body = zin.read(info)
                zout.writestr(info.filename, _with_deep(body, kind) if info.filename.endswith("data.pkl") else body)
    return setup


def _paper_pickle_with(name: str = "paper.pth", raw_args: Optional[bytes] = None, **body):
    """A legacy-format paper pickle (default flags, no weights) with ``body``'s entries; ``raw_args``: the
    args record replaced by these pickle opcodes."""
    def setup(tmp, run, monkeypatch):
        content = {"args": argparse.Namespace(data="cifar10") if raw_args is None else SENTINEL, "state_dict": {}}
        content.update(body)
        parts = []
        for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}, content, []):
            parts.append(pickle.dumps(part, protocol=2))
        if raw_args is not None:
            token = b"X" + len(SENTINEL).to_bytes(4, "little") + SENTINEL.encode()
            parts[3] = parts[3].replace(token, raw_args)
        (tmp / name).write_bytes(b"".join(parts))
    return setup


def _legacy_storage_claiming(numel: int, name: str = "paper.pth"):
    """A legacy-format paper pickle whose one weight's storage record claims ``numel`` floats (the file holds 40
    bytes): the reader would allocate it before reading the bytes that follow the pickle."""
    def setup(tmp, run, monkeypatch):
        import collections
        import io

        marker = object()

        class Weight:
            def __reduce__(self):
                return torch._utils._rebuild_tensor_v2, (marker, 0, (10,), (1,), False, collections.OrderedDict())

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is marker else None

        buf = io.BytesIO()
        for part in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}):
            pickle.dump(part, buf, protocol=2)
        Pickler(buf, protocol=2).dump({"args": argparse.Namespace(data="cifar10"), "state_dict": {"w": Weight()}})
        pickle.dump(["0"], buf, protocol=2)
        buf.write(numel.to_bytes(8, "little") + bytes(40))
        (tmp / name).write_bytes(buf.getvalue())
    return setup


def _bad_rng(rng):
    return lambda ckpt: ckpt.update(rng=rng)


def _tmp_leftover(tmp, run, monkeypatch):
    (run / "models" / ".tmp-killed.pth").write_bytes(b"half a checkpoint")


def _in_place(edit, leftover: bool = True):
    """Edit run/models/most_recent.pth in place (resuming it trains in that folder), leaving a .tmp file of an
    interrupted save that the clean-up would remove."""
    def setup(tmp, run, monkeypatch):
        _edit_in_place(run / "models" / "most_recent.pth", edit)
        if leftover:
            _tmp_leftover(tmp, run, monkeypatch)
    return setup


def _nan_optimizer(ckpt):
    state = next(iter(ckpt["optimizer"]["state"].values()))
    state["exp_avg"].view(-1)[0] = float("nan")


EVAL_C = ["--resume", "{tmp}/c.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"]
NEW = ("new", "new/*", "new/models/*")  # a refused --save {tmp}/new is never created
RUN_ALL = ("run/*", "run/models/*")
CKPT_CASES = [
    # 1. the best-5 clean-up deletes only this run's files in this folder, found by name
    *[Case(f"best-list-escape-{escape}", R + ["--max-iters", "31"], 0, None, unchanged=ELSEWHERE,
           gone=["run/models/checkpt-0005.pth"], setup=_escaping_best_list(escape))
      for escape in ("dotdot", "absolute", "symlinked-folder", "symlink")],
    Case("best-list-of-another-run", R[:1] + ["{tmp}/run/models/most_recent.pth", "--nworkers", "0", "--max-iters", "31",
                                              "--save", "{tmp}/run2"], 0, None, unchanged=RUN_ALL, setup=_other_run_best),
    Case("best-list-of-copied-run", ["--resume", "{tmp}/copy/models/most_recent.pth", "--nworkers", "0", "--max-iters", "31"],
         0, None, unchanged=RUN_ALL, gone=["copy/models/checkpt-0005.pth"], setup=_copied_run),
    # 2. silently wrong before: another --data, NaN optimizer moments, a damaged byte
    Case("resume-other-data", RESUME_C + ["--data", "mnist"], 1,
         r"--data mnist \(checkpoint: digits\) conflicts with the architecture stored in .*c.pth", unchanged=NEW,
         gone=["new"], setup=_edit_checkpoint("c.pth", lambda c: None)),
    Case("resume-nan-exp-avg", RESUME_C, 1, r"c.pth: its optimizer state holds NaN or infinite values .*exp_avg",
         gone=["new"], setup=_edit_checkpoint("c.pth", _nan_optimizer)),
    Case("evaluate-flipped-weight-byte", EVAL_C, 1, r"c.pth: the file is damaged: Bad CRC-32 for file '.*data/\d+'",
         gone=["eval"], setup=_flip_byte()),
    Case("resume-flipped-byte-in-place", R + ["--max-iters", "3"], 1, r"most_recent.pth: the file is damaged: Bad CRC-32",
         unchanged=RUN_ALL, setup=_flip_byte(name="run/models/most_recent.pth")),
    Case("paper-checkpoint-flipped-byte", ["--resume", "{tmp}/paper.pth", "--evaluate", "--nworkers", "0", "--save",
                                           "{tmp}/eval"], 1, r"paper.pth: the file is damaged: Bad CRC-32", gone=["eval"],
         setup=_flip_byte(src=str(REPO / "tests" / "reference" / "legacy" / "checkpoint.pth"), name="paper.pth")),
    # 3. a refused resume leaves the folder as it was: no logs, no lock file, no clean-up
    Case("torch-rng-malformed-new-folder", RESUME_C, 1, r"random-number state cannot be restored", gone=["new"],
         setup=_edit_checkpoint("c.pth", _bad_rng({"torch": torch.zeros(3, dtype=torch.uint8)}))),
    Case("python-rng-malformed-in-place", R + ["--max-iters", "3"], 1, r"random-number state cannot be restored",
         unchanged=RUN_ALL + ("run/models/.tmp-*",), setup=_in_place(lambda c: c["rng"].update(python=(3, [1, 2, 3], None)))),
    Case("per-rank-rng-malformed-in-place", R + ["--max-iters", "3"], 1, r"random-number state cannot be restored",
         unchanged=RUN_ALL + ("run/models/.tmp-*",), setup=_in_place(lambda c: c.update(rng={"per_rank": [c["rng"], {"torch": "x"}]}))),
    Case("evaluate-missing-data-creates-nothing", EVAL_C + ["--dataroot", "{tmp}/nodata"], 1, r"(?i)mnist", gone=["eval"],
         setup=_edit_checkpoint("c.pth", lambda c: c["config"].update(data="mnist", imagesize=8))),
    Case("resume-missing-data-creates-nothing", RESUME_C + ["--dataroot", "{tmp}/nodata"], 1, r"(?i)mnist", gone=["new"],
         setup=_edit_checkpoint("c.pth", lambda c: c["config"].update(data="mnist", imagesize=8))),
    # 6. crafted structures and numbers: one line before any of it is used
    Case("model-config-200000-deep-dict", EVAL_C, 1, r"c.pth: damaged or crafted checkpoint: it is nested more than \d+ levels",
         gone=["eval"], setup=_deep_checkpoint("model_config.nblocks", "dict")),
    Case("nblocks-200000-nested-lists", EVAL_C, 1, r"c.pth: damaged or crafted checkpoint: it is nested more than \d+ levels",
         gone=["eval"], setup=_deep_checkpoint("model_config.nblocks", "list")),
    Case("step-1e30-other-world-size", RESUME_C, 1, r"c.pth: damaged or crafted checkpoint: it holds an integer of 100 bits at step",
         gone=["new"], setup=_edit_checkpoint("c.pth", lambda c: c.update(step=10**30, rng={"per_rank": [c["rng"]] * 3}))),
    Case("step-1e13", RESUME_C, 1, r"c.pth: damaged checkpoint \(its step counter is 10000000000000, not an integer in",
         gone=["new"], setup=_edit_checkpoint("c.pth", lambda c: c.update(step=10**13))),
    Case("best-score-nan", RESUME_C, 1, r"list of best checkpoints is malformed", gone=["new"],
         setup=_edit_checkpoint("c.pth", lambda c: c.update(best=[[float("nan"), 0, "checkpt-0000.pth"]]))),
    Case("best-epoch-repeated", RESUME_C, 1, r"list of best checkpoints names epochs \[0, 0\], repeated or not before", gone=["new"],
         setup=_edit_checkpoint("c.pth", lambda c: c.update(epoch=3, best=[[1.0, 0, "a"], [2.0, 0, "b"]]))),
    Case("best-epoch-in-the-future", RESUME_C, 1, r"names epochs \[7\], repeated or not before its epoch 0", gone=["new"],
         setup=_edit_checkpoint("c.pth", lambda c: c.update(best=[[1.0, 7, "checkpt-0007.pth"]]))),
    Case("fc-idim-1e12", EVAL_C, 1, r"c.pth: cannot rebuild its model \(.*overflow", gone=["eval"],
         setup=_edit_checkpoint("c.pth", _set_config(fc_idim=10**12))),
    Case("config-integer-key", EVAL_C, 1, r"its 'config' has a key that is not a setting name: 7", gone=["eval"],
         setup=_edit_checkpoint("c.pth", lambda c: c["config"].update({7: 1}))),
    Case("paper-test-bpd-1e400", ["--resume", "{tmp}/paper.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"paper.pth: it holds an integer of 1329 bits at test_bpd", gone=["eval"], setup=_paper_pickle_with(test_bpd=10**400)),
    Case("paper-test-bpd-inf", ["--resume", "{tmp}/paper.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"paper.pth: its test_bpd is not a finite number \(inf\)", gone=["eval"],
         setup=_paper_pickle_with(test_bpd=float("inf"))),
    Case("paper-args-integer-keys", ["--resume", "{tmp}/paper.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"paper.pth: its 'args' record has a key that is not a flag name \(1\)", gone=["eval"],
         setup=_paper_pickle_with(args={1: 2, "data": "cifar10"})),
    Case("paper-args-200000-deep", ["--resume", "{tmp}/paper.pth", "--evaluate", "--nworkers", "0", "--save", "{tmp}/eval"], 1,
         r"paper.pth: it is nested more than \d+ levels deep", gone=["eval"], setup=_paper_pickle_with(raw_args=_deep("list"))),
    Case("format-version-string", EVAL_C, 1, r"c.pth: damaged checkpoint \(its format_version is 'x', not an integer\)",
         gone=["eval"], setup=_edit_checkpoint("c.pth", lambda c: c.update(format_version="x"))),
    Case("epoch-counter-none", RESUME_C, 1, r"c.pth: damaged checkpoint \(no epoch counter\)", gone=["new"],
         setup=_edit_checkpoint("c.pth", lambda c: c.update(epoch=None))),
    Case("resume-finished-run-changes-nothing", R + ["--max-iters", "2"], 0, None, unchanged=RUN_ALL + ("run/models/.tmp-*",),
         setup=_tmp_leftover, stdout=r"already reached --max-iters 2 \(step 2\); nothing to do"),
    Case("paper-legacy-storage-claims-4-tb", ["--resume", "{tmp}/paper.pth", "--evaluate", "--nworkers", "0", "--save",
                                              "{tmp}/eval"], 1,
         r"paper.pth: storage 0 claims 4000000000000 bytes, more than the whole file holds", gone=["eval"],
         setup=_legacy_storage_claiming(10**12)),
    # 6b. a zip bomb is refused from its directory, before anything is inflated
    Case("zip-bomb", EVAL_C, 1, r"c.pth: its zip entries declare 100 MiB in a 0.\d\d MiB file \(a zip bomb\?\)", gone=["eval"],
         setup=_zip_bomb()),
]


@pytest.mark.parametrize("case", CKPT_CASES, ids=[c.id for c in CKPT_CASES])
def test_bad_checkpoint_input(case: Case, trained, tmp_path, monkeypatch, capsys):
    _outside_files(tmp_path)
    test_bad_input(case, trained, tmp_path, monkeypatch, capsys)


def test_clean_up_removes_only_own_regular_files(tmp_path):
    """remove_own_file / remove_leftovers: bare names of this run's scheme, regular files directly in the
    folder, never through a symlink (a file's or the folder's), never a path."""
    from resflows.entry import remove_leftovers, remove_own_file

    _outside_files(tmp_path)
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    for name in ("checkpt-0001.pth", "checkpt-0002.pth", "checkpt-final.pth", "checkpt-12.pth", ".tmp-x.pth", "notes.txt"):
        (models / name).write_text(name)
    (models / "checkpt-0003.pth").symlink_to(tmp_path / "elsewhere" / "thesis.tex")
    (models / "checkpt-0004.pth").mkdir()
    linked = tmp_path / "run2" / "models"
    linked.parent.mkdir()
    linked.symlink_to(models, target_is_directory=True)
    before = _digest((tmp_path / "elsewhere").glob("*"))
    for bad in ("../../elsewhere/thesis.tex", str(tmp_path / "elsewhere" / "abs.txt"), "..", "", "checkpt-0003.pth",
                "checkpt-0004.pth"):
        assert remove_own_file(str(models), bad) is False, bad
    assert remove_own_file(str(linked), "checkpt-0001.pth") is False  # through a symlinked folder
    remove_leftovers([str(linked)], keep_checkpoints=[])  # nothing through a symlinked folder either
    assert (models / "checkpt-0001.pth").exists() and (models / ".tmp-x.pth").exists()
    remove_leftovers([str(models)], keep_checkpoints=["checkpt-0002.pth"])
    assert sorted(os.listdir(models)) == sorted(["checkpt-0002.pth", "checkpt-0003.pth", "checkpt-0004.pth",
                                                 "checkpt-final.pth", "checkpt-12.pth", "notes.txt"])
    assert _digest((tmp_path / "elsewhere").glob("*")) == before


def test_sigkill_between_a_new_best_and_deleting_the_one_it_displaced(trained, tmp_path):
    """SIGKILL after a new best and most_recent.pth are written but before the displaced best file is removed:
    resuming removes exactly that file (by name, in this folder) and trains on."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    models = run / "models"
    entries = []
    for e in range(1, 6):
        shutil.copy(models / "most_recent.pth", models / f"checkpt-{e:04d}.pth")
        entries.append((1e6 + e, e, f"checkpt-{e:04d}.pth"))
    _edit_in_place(models / "most_recent.pth", _best_list(entries))
    code = ("import os, signal, sys; import resflows.trainer as t; "
            "t.remove_own_file = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
            "import train_img; sys.exit(train_img.main(sys.argv[1:]))")
    argv = ["--resume", str(models / "most_recent.pth"), "--nworkers", "0"]
    p = subprocess.run([sys.executable, "-c", code] + argv + ["--max-iters", "31"], capture_output=True, text=True,
                       cwd=REPO, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "RESFLOWS_OFFLINE": "1"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (models / "checkpt-0006.pth").exists() and (models / "checkpt-0005.pth").exists()
    assert sorted(b[1] for b in torch.load(models / "most_recent.pth", weights_only=True)["best"]) == [1, 2, 3, 4, 6]
    assert train_img.main(argv + ["--max-iters", "32"]) == 0
    assert sorted(n for n in os.listdir(models) if n.startswith("checkpt-")) == [f"checkpt-{e:04d}.pth" for e in (1, 2, 3, 4, 6)]


# -- flag-only rules and sizes: refused when parsing, before --save exists (exit 2, nothing created) ----------------
def _celeba_5bit_8bit_levels(tmp, run, monkeypatch):
    folder = tmp / "data" / "celebahq64_5bit"
    folder.mkdir(parents=True)
    torch.save(torch.randint(0, 256, (60, 3, 64, 64), dtype=torch.uint8), folder / "celeba_full_64x64_5bit.pth")


def _mnist_raw(files: dict):
    def setup(tmp, run, monkeypatch):
        raw = tmp / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name, data in files.items():
            (raw / name).write_bytes(data)
    return setup


def _truncated_gz() -> bytes:
    import gzip

    return gzip.compress(b"\x00\x00\x08\x03" + os.urandom(5000))[:200]  # incompressible: the cut loses data


def _memory_limit(gb: str):
    def setup(tmp, run, monkeypatch):
        monkeypatch.setenv("RESFLOWS_MEMORY_LIMIT_GB", gb)
    return setup


def _never_finite(tmp, run, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: torch.tensor(float("nan")))


NEW_RUN = ["--max-iters", "1", "--save", "{tmp}/new"]
MNIST = TINY[2:] + ["--data", "mnist", "--imagesize", "28", "--dataroot", "{tmp}/data", "--max-iters", "1", "--save", "{tmp}/new"]
FLAG_CASES = [
    Case("nblocks-empty", TINY + ["--nblocks", ""] + NEW_RUN, 2, r"--nblocks must be positive integers joined by '-'", gone=["new"]),
    Case("nblocks-2-x", TINY + ["--nblocks", "2-x"] + NEW_RUN, 2, r"--nblocks must be positive integers .* got '2-x'", gone=["new"]),
    Case("nblocks-0-1", TINY + ["--nblocks", "0-1"] + NEW_RUN, 2, r"--nblocks must be positive integers .* got '0-1'", gone=["new"]),
    Case("vnorms-2x22", TINY + ["--vnorms", "2x22"] + NEW_RUN, 2, r"--vnorms takes one norm order per character", gone=["new"]),
    Case("vnorms-too-few", TINY + ["--vnorms", "22"] + NEW_RUN, 2, r"--vnorms needs one more order than --kernels", gone=["new"]),
    Case("kernels-3-2-3", TINY + ["--kernels", "3-2-3"] + NEW_RUN, 2, r"--kernels must be odd sizes", gone=["new"]),
    Case("kernels-empty", TINY + ["--kernels", ""] + NEW_RUN, 2, r"--kernels must be positive integers", gone=["new"]),
    Case("densenet-coupling", TINY + ["--densenet", "True", "--block", "coupling"] + NEW_RUN, 2, r"drop --block coupling", gone=["new"]),
    Case("densenet-odd-growth-clipswish", TINY + ["--densenet", "True", "--densenet_growth", "33", "--act", "CLipSwish"] + NEW_RUN, 2,
         r"--densenet_growth must be even with --act CLipSwish", gone=["new"]),
    Case("densenet-learn-p", TINY + ["--densenet", "True", "--learn-p", "True"] + NEW_RUN, 2, r"--learn-p is not available", gone=["new"]),
    Case("too-many-scales", TINY + ["--imagesize", "8", "--nblocks", "1-1-1"] + NEW_RUN, 2, r"asks for 3 scales, but a 8x8 model input "
         r"allows at most 2", gone=["new"]),
    Case("imagesize-4-mnist", MNIST + ["--imagesize", "4", "--nblocks", "1-1-1"], 2, r"asks for 3 scales, but a 4x4 model input",
         gone=["new", "data/MNIST"]),
    Case("odd-scale", TINY[2:] + ["--data", "mnist", "--imagesize", "12", "--nblocks", "1-1-1"] + NEW_RUN, 2,
         r"scale 1 has a 6x6 feature map|cannot be squeezed|asks for 3 scales", gone=["new"]),
    Case("squeeze-first-odd", TINY[2:] + ["--data", "mnist", "--imagesize", "9", "--squeeze-first", "True"] + NEW_RUN, 2,
         r"--squeeze-first needs an even image size", gone=["new"]),
    Case("evaluate-without-resume", TINY + ["--evaluate", "--save", "{tmp}/new"], 2, r"--evaluate and --sample need a checkpoint",
         gone=["new"]),
    Case("sample-without-resume", TINY + ["--sample", "4", "--save", "{tmp}/new"], 2, r"need a checkpoint: add --resume", gone=["new"]),
    Case("save-empty", TINY + ["--max-iters", "1", "--save", ""], 2, r"--save is empty"),
    Case("resume-typo-in-nblocks", R + ["--nblocks", "2-x", "--max-iters", "3"], 2, r"--nblocks must be positive integers"),
    # sizes that would hang or exhaust memory: one line naming the estimate
    Case("nblocks-100000-100000", TINY + ["--nblocks", "100000-100000", "--idim", "512"] + NEW_RUN, 2,
         r"these flags need at least [\d.e+]+ TB of memory \(parameters .*\), more than the .* (has|allows); use", gone=["new"]),
    Case("fc-idim-1e7", TINY + ["--fc-idim", "10000000"] + NEW_RUN, 2, r"need at least .* TB .*use fewer --nblocks or a smaller --idim, "
         r"--fc-idim", gone=["new"]),
    Case("fc-idim-1e12", TINY + ["--fc-idim", "1000000000000"] + NEW_RUN, 2, r"need at least .* of memory", gone=["new"]),
    Case("idim-1e8", TINY + ["--idim", "100000000"] + NEW_RUN, 2, r"need at least .* of memory", gone=["new"]),
    Case("batchsize-1e8", TINY + ["--batchsize", "100000000"] + NEW_RUN, 2, r"training activations .*use a smaller --batchsize",
         gone=["new"]),
    Case("val-batchsize-1e10", TINY + ["--val-batchsize", "10000000000"] + NEW_RUN, 2, r"use a smaller --val-batchsize", gone=["new"]),
    Case("imagesize-1e5", TINY[2:] + ["--data", "mnist", "--imagesize", "100000"] + NEW_RUN, 2, r"need at least .* TB of memory",
         gone=["new"]),
    Case("densenet-growth-1e8", TINY + ["--densenet", "True", "--densenet_growth", "100000000"] + NEW_RUN, 2, r"need at least .* of memory",
         gone=["new"]),
    Case("padding-1e7", TINY + ["--padding", "10000000"] + NEW_RUN, 2, r"need at least .* of memory", gone=["new"]),
    Case("cdim-1e9-hybrid", TINY + ["--task", "hybrid", "--cdim", "1000000000"] + NEW_RUN, 2, r"need at least .* of memory", gone=["new"]),
    Case("stated-memory-limit", TINY + NEW_RUN, 2, r"more than the 1 MB RESFLOWS_MEMORY_LIMIT_GB allows", setup=_memory_limit("0.001"),
         gone=["new"]),
    Case("sample-1e9", R + ["--sample", "1000000000"], 1, r"need at least .* of memory \(.*sampling .*\).*use a smaller --sample",
         gone=["run/samples"]),
    Case("toy-nblocks-1e7", TOY + ["--nblocks", "10000000", "--save", "{tmp}/toy"], 2,
         r"--nblocks 10000000 asks for 10000000 blocks; more than 10000 would take hours",
         script="toy", gone=["toy"]),
    Case("toy-nblocks-1e7-default-dims", TOY[4:] + ["--nblocks", "10000000", "--save", "{tmp}/toy"], 2,
         r"these flags need at least .* TB of memory", script="toy", gone=["toy"]),
    Case("toy-nblocks-20000-realnvp", TOY + ["--arch", "realnvp", "--nblocks", "20000", "--save", "{tmp}/toy"], 2,
         r"asks for 40000 blocks", script="toy", gone=["toy"]),
    Case("nblocks-6000-6000-tiny", TINY + ["--nblocks", "6000-6000", "--idim", "1"] + NEW_RUN, 2,
         r"asks for 1200\d blocks; more than 10000", gone=["new"]),
    Case("toy-batch-1e9", TOY + ["--batch_size", "1000000000", "--save", "{tmp}/toy"], 2, r"use a smaller --batch_size", script="toy",
         gone=["toy"]),
    Case("toy-test-batch-1e11", TOY + ["--test_batch_size", "100000000000", "--save", "{tmp}/toy"], 2,
         r"use a smaller --test_batch_size", script="toy", gone=["toy"]),
    Case("toy-viz-npts-1e7", TOY + ["--viz_npts", "10000000", "--save", "{tmp}/toy"], 2, r"use a smaller --viz_npts", script="toy",
         gone=["toy"]),
    Case("toy-dims-1e6-1e6", TOY + ["--dims", "1000000-1000000", "--save", "{tmp}/toy"], 2, r"need at least .* of memory", script="toy",
         gone=["toy"]),
    Case("toy-dims-empty", TOY + ["--dims", "", "--save", "{tmp}/toy"], 2, r"--dims must be positive integers", script="toy",
         gone=["toy"]),
    Case("toy-save-empty", TOY + ["--save", ""], 2, r"--save is empty", script="toy"),
    # data that cannot be right: one line naming the file, nothing half-written left
    Case("celeba-5bit-with-8bit-levels", TINY[2:] + ["--data", "celeba_5bit", "--dataroot", "{tmp}/data", "--nblocks", "1-1"] + NEW_RUN, 1,
         r"celeba_full_64x64_5bit.pth holds pixel levels up to 25\d .*32 levels, 0 to 31", setup=_celeba_5bit_8bit_levels,
         gone=["new/models/*.pth", "new/imgs"]),
    Case("mnist-garbage-idx", MNIST, 1, r"train-images-idx3-ubyte is not a valid MNIST idx file \(it does not start with the idx magic",
         setup=_mnist_raw({n: os.urandom(3000) for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")})),
    Case("mnist-truncated-idx", MNIST, 1, r"t10k-labels-idx1-ubyte is not a valid MNIST idx file \(its header announces 10000 items",
         setup=_mnist_raw({"t10k-labels-idx1-ubyte": b"\x00\x00\x08\x01\x00\x00\x27\x10" + bytes(100)})),
    Case("mnist-empty-idx", MNIST, 1, r"train-labels-idx1-ubyte is not a valid MNIST idx file \(it is only 0 bytes long\)",
         setup=_mnist_raw({"train-labels-idx1-ubyte": b""})),
    Case("mnist-truncated-gz", MNIST, 1, r"train-images-idx3-ubyte.gz is not a complete gzip file \(EOFError\); delete it",
         setup=_mnist_raw({"train-images-idx3-ubyte.gz": _truncated_gz()}),
         gone=["data/MNIST/raw/*.part", "data/MNIST/raw/train-images-idx3-ubyte"]),
    Case("mnist-garbage-gz", MNIST, 1, r"train-images-idx3-ubyte.gz is not a complete gzip file \(BadGzipFile\)",
         setup=_mnist_raw({"train-images-idx3-ubyte.gz": os.urandom(500)}), gone=["data/MNIST/raw/*.part"]),
    # the non-finite-step rule: no grid drawn from skipped steps, and the truth about the last checkpoint
    Case("never-finite-no-checkpoint", TINY + ["--vis-freq", "1", "--max-iters", "10", "--save", "{tmp}/new"], 1,
         r"non-finite for 5 steps in a row .*no checkpoint was written yet", setup=_never_finite,
         gone=["new/imgs/*.png", "new/models/*.pth"]),
    Case("never-finite-after-resume", R + ["--max-iters", "10", "--vis-freq", "1"], 1,
         r"non-finite for 5 steps in a row .*the last good checkpoint is .*run/models/most_recent.pth", setup=_never_finite,
         gone=["run/imgs/*.png"]),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c.id for c in FLAG_CASES])
def test_bad_flag_or_size_or_data(case: Case, trained, tmp_path, monkeypatch, capsys):
    test_bad_input(case, trained, tmp_path, monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("script, argv, written", [
    ("train_img.py", TINY + ["--max-iters", "50"], "models/most_recent.pth"),
    ("train_toy.py", TOY[:-6] + ["--niters", "50", "--seed", "1"], "last.pth"),
])
def test_sigterm_while_starting_exits_0_after_saving(tmp_path, script, argv, written):
    """SIGTERM as soon as the run logs its first line (still starting): it stops at the end of its first step,
    saved, status 0 (not 143)."""
    save = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(REPO / script)] + argv + ["--save", str(save)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO), "RESFLOWS_OFFLINE": "1"})
    assert p.stdout.readline()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert (save / written).is_file()


def test_signal_after_the_final_save_changes_nothing(tmp_path, monkeypatch):
    """A SIGTERM arriving after the loop (here: raised by the 'done' hook) is recorded, not fatal: exit 0."""
    def hook(stage, trainer):
        if stage == "done":
            os.kill(os.getpid(), signal.SIGTERM)
    assert train_img.run(TINY + ["--max-iters", "1", "--save", str(tmp_path / "run")], hook=hook) == 0
    assert (tmp_path / "run" / "models" / "most_recent.pth").is_file()
