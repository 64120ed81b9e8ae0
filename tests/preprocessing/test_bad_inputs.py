"""Bad luck and bad input in the preprocessing scripts: each case ends in one line and a known exit status,
leaves no temporary file behind and leaves existing outputs untouched.

A full disk is simulated in three ways: ``os.posix_fallocate`` failing with ENOSPC (the reservation of a
memory-mapped temporary), the ``.pth`` writer failing with ENOSPC (torch hides that behind a RuntimeError),
``shutil.disk_usage`` reporting too little room (the check before any work) and, where this machine allows
mount namespaces, a real 512 KiB tmpfs, on which an unreserved memory-mapped file ends in SIGBUS.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections import namedtuple
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from preprocessing import _common, convert_to_pth, create_imagenet_benchmark_datasets, extract_celeba_from_tfrecords

from .helpers import SCRIPTS, celeba_example, leftovers, random_images, write_tfrecord

MODULES = {
    "convert_to_pth.py": convert_to_pth,
    "extract_celeba_from_tfrecords.py": extract_celeba_from_tfrecords,
    "create_imagenet_benchmark_datasets.py": create_imagenet_benchmark_datasets,
}
SENTINEL = b"an older, complete output that must survive a failed run"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def _npy(tmp_path) -> List[str]:
    np.save(tmp_path / "in" / "a.npy", random_images(np.random.default_rng(0), 6, (8, 8, 3)))
    (tmp_path / "in" / "a.pth").write_bytes(SENTINEL)  # the output of an earlier run
    return [str(tmp_path / "in" / "a.npy")]


def _tfrecords(tmp_path) -> List[str]:
    rng = np.random.default_rng(1)
    for i in range(2):
        write_tfrecord(tmp_path / "in" / "celeba-tfr" / "validation" / f"validation-r08-s-{i:04d}-of-0002.tfrecords",
                       [celeba_example(img) for img in random_images(rng, 2, (256, 256, 3))])
    (tmp_path / "out" / "celebahq").mkdir(parents=True)
    (tmp_path / "out" / "celebahq" / "celeba256_validation.pth").write_bytes(SENTINEL)
    return ["--input-dir", str(tmp_path / "in" / "celeba-tfr"), "--dataroot", str(tmp_path / "out"),
            "--split", "validation"]


def _pngs(tmp_path, n: int = 3) -> List[str]:
    folder = tmp_path / "in" / "imagenet32" / "valid_32x32"
    folder.mkdir(parents=True)
    for i, img in enumerate(random_images(np.random.default_rng(2), n, (32, 32, 3))):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    (tmp_path / "in" / "imagenet32" / "valid_32x32.pth").write_bytes(SENTINEL)
    (tmp_path / "in" / "imagenet32" / "valid_32x32.npy").write_bytes(SENTINEL)
    return ["--dataroot", str(tmp_path / "in"), "--resolution", "32", "--split", "valid"]


def _png_claiming(tmp_path, width: int, height: int) -> List[str]:
    """A valid 32x32 PNG among good ones whose header (IHDR, CRC fixed up) claims ``width`` x ``height``."""
    args = _pngs(tmp_path)
    path = tmp_path / "in" / "imagenet32" / "valid_32x32" / "001.png"
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"  # signature (8) + chunk length (4), then the chunk type
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return args


# ------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fallocate_fails(monkeypatch) -> None:
    monkeypatch.setattr(os, "posix_fallocate", _enospc)


def pth_write_fails(monkeypatch) -> None:
    """The disk fills up while torch.save streams the tensor into the .pth (after the first piece)."""
    original = _common._ProgressWriter.write

    def write(self, data):
        if getattr(self, "_written", False):
            _enospc()
        self._written = True
        return original(self, memoryview(data).cast("B")[:1024])

    monkeypatch.setattr(_common._ProgressWriter, "write", write)


def disk_nearly_full(monkeypatch) -> None:
    """The disk has 10 KB free: too little for any of the outputs here, which the scripts must see first."""
    usage = shutil.disk_usage

    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=10_000))


def a_bug(monkeypatch) -> None:
    """An unexpected exception deep inside (a stand-in for a bug): traceback plus a line saying it is one."""
    def broken(*args, **kwargs):
        raise ZeroDivisionError("stand-in for a bug")

    monkeypatch.setattr(_common, "nhwc_to_nchw", broken)


def no_fault(monkeypatch) -> None:
    pass


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
Case = namedtuple("Case", "script inputs fault status line")
DISK_FULL = r"disk full: .* needs [\d.]+ [KMG]?B of free space in .*, but .*[\d.]+ [KMG]?B is .*free"
CASES: Dict[str, Case] = {
    "convert: temporary cannot be reserved": Case("convert_to_pth.py", _npy, fallocate_fails, 1, DISK_FULL),
    "convert: disk fills while the .pth is written": Case("convert_to_pth.py", _npy, pth_write_fails, 1,
                                                          r"disk full: writing a\.pth needs .* of free space"),
    "convert: too little room before starting": Case("convert_to_pth.py", _npy, disk_nearly_full, 1,
                                                     r"disk full: writing a\.pth .* needs 67\.8 KB of free space .* only 10\.0 KB is free"),
    "convert: internal error": Case("convert_to_pth.py", _npy, a_bug, 70,  # EX_SOFTWARE
                                    r"internal error .*this is a bug in resflows, please report it"),
    "celeba: temporary cannot be reserved": Case("extract_celeba_from_tfrecords.py", _tfrecords, fallocate_fails,
                                                 1, DISK_FULL),
    "celeba: disk fills while the .pth is written": Case("extract_celeba_from_tfrecords.py", _tfrecords,
                                                         pth_write_fails, 1, r"disk full: writing celeba256_validation"),
    "celeba: too little room before starting": Case("extract_celeba_from_tfrecords.py", _tfrecords,
                                                    disk_nearly_full, 1, r"disk full: .*\(4 images: .* needs 1\.6 MB"),
    "imagenet: .npy cannot be reserved": Case("create_imagenet_benchmark_datasets.py", _pngs, fallocate_fails, 1,
                                              DISK_FULL),
    # --no-npy: with the .npy, that file is complete (and replaced) before the .pth fails.
    "imagenet: disk fills while the .pth is written": Case("create_imagenet_benchmark_datasets.py",
                                                           lambda t: _pngs(t) + ["--no-npy"], pth_write_fails, 1,
                                                           r"disk full: writing valid_32x32\.pth"),
    "imagenet: too little room before starting": Case("create_imagenet_benchmark_datasets.py", _pngs,
                                                      disk_nearly_full, 1, r"disk full: building valid_32x32 .* needs 93\.2 KB"),
    "convert: --max-value 300": Case("convert_to_pth.py", lambda t: _npy(t) + ["--max-value", "300"], no_fault, 2,
                                     r"--max-value must be in 1\.\.255, got 300 \(see --help\)"),
    "celeba: --split test": Case("extract_celeba_from_tfrecords.py", lambda t: _tfrecords(t) + ["--split", "test"],
                                 no_fault, 2, r"argument --split: invalid choice: 'test'"),
    "imagenet: --resolution 48": Case("create_imagenet_benchmark_datasets.py",
                                      lambda t: _pngs(t) + ["--resolution", "48"], no_fault, 2,
                                      r"argument --resolution: invalid choice: 48"),
    "imagenet: PNG header claims 50000x50000": Case(
        "create_imagenet_benchmark_datasets.py", lambda t: _png_claiming(t, 50000, 50000), no_fault, 1,
        r"valid_32x32/001\.png: header claims a huge image, refused as a possible decompression bomb .*"
        r"expected 32x32 RGB"),
    "imagenet: PNG header claims 10000x10000 (Pillow only warns)": Case(
        "create_imagenet_benchmark_datasets.py", lambda t: _png_claiming(t, 10000, 10000), no_fault, 1,
        r"valid_32x32/001\.png: header claims a huge image"),
}


def _snapshot(root) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _message_lines(stderr: str) -> List[str]:
    """What stays on a terminal: for each line the text after the last carriage return; progress bars and
    notes (such as extract_celeba's about the pure-Python CRC) left out."""
    shown = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in shown if line.strip() and "%|" not in line and ": note: " not in line]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_loses_nothing(name, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    (tmp_path / "in").mkdir()
    argv = case.inputs(tmp_path)
    before = _snapshot(tmp_path)
    case.fault(monkeypatch)

    try:
        status = MODULES[case.script].main(argv)
    except SystemExit as e:  # argparse, for a bad flag
        status = e.code

    err = capsys.readouterr().err
    lines = _message_lines(err)
    assert status == case.status, err
    assert lines and re.fullmatch(rf"{re.escape(case.script)}: error: .*{case.line}.*", lines[-1]), err
    if case.status != 70:
        assert len(lines) == 1 and "Traceback" not in err, err  # one line, nothing else
    else:
        assert lines[0] == "Traceback (most recent call last):", err
    assert leftovers(tmp_path) == []  # every temporary removed
    assert _snapshot(tmp_path) == before  # no output replaced, nothing new written


# ------------------------------------------------------------------------------------------------
# A real full disk
# ------------------------------------------------------------------------------------------------
def _can_mount_tmpfs(tmp_path) -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("size", ["512k", "1m"])  # too small for the temporary; room for it but not the .pth
def test_real_full_disk_is_one_line_not_sigbus(size, tmp_path):
    """convert_to_pth.py onto a small tmpfs (in a private mount namespace, so nothing leaks): without the
    reservation the temporary's pages fault with SIGBUS (exit 135, no message, a hidden 786 KB file left)."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a mount namespace here")
    src, out = tmp_path / "a.npy", tmp_path / "out"
    np.save(src, random_images(np.random.default_rng(3), 64, (64, 64, 3)))  # 786 KB
    out.mkdir()
    script = (f"mount -t tmpfs -o size={size} tmpfs {out} && {sys.executable} {SCRIPTS / 'convert_to_pth.py'} "
              f"{src} --out-dir {out}; status=$?; ls -A {out}; exit $status")
    proc = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 1, proc.stderr
    lines = _message_lines(proc.stderr)
    assert len(lines) == 1 and re.fullmatch(rf"convert_to_pth\.py: error: {DISK_FULL}.*", lines[0]), proc.stderr
    assert proc.stdout.strip() == ""  # `ls -A` of the tmpfs: no temporary left behind
