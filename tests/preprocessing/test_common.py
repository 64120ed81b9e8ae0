"""preprocessing/_common.py: atomic outputs and page release (in-process, no torch needed)."""
import os

import numpy as np
import pytest

from preprocessing import _common


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with _common.atomic_output(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]

    with _common.atomic_output(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_release_pages_keeps_the_data(tmp_path):
    path = tmp_path / "a.npy"
    arr = _common.open_memmap(str(path), (64, 3, 32, 32))
    arr[:] = np.arange(arr.size, dtype=np.int64).reshape(arr.shape) % 251
    expected = np.array(arr)  # a private copy to compare with
    for start in range(0, 64, 7):  # ranges that start and end mid-page
        _common.release_pages(arr[start : start + 7])
    assert np.array_equal(arr, expected)  # pages come back from the file on the next access
    arr.flush()
    del arr
    assert np.array_equal(np.load(path), expected)

    ro = np.load(path, mmap_mode="r")
    _common.release_pages(ro[10:20])
    assert np.array_equal(ro, expected)


def test_release_pages_leaves_private_memory_alone(tmp_path):
    plain = np.ones((4, 4096), np.uint8)
    _common.release_pages(plain[1:3])
    assert plain.min() == 1
    np.save(tmp_path / "c.npy", np.zeros((4, 4096), np.uint8))
    cow = np.load(tmp_path / "c.npy", mmap_mode="c")  # copy-on-write: dropping pages would lose edits
    cow[:] = 5
    _common.release_pages(cow)
    assert cow.min() == 5


def test_error_is_one_line(capsys):
    def fail(argv):
        raise _common.InputError("some/file.npy: first line\nsecond line")

    assert _common.run_cli(fail, [], "prog.py") == 1
    assert capsys.readouterr().err == "prog.py: error: some/file.npy: first line second line\n"

    def missing(argv):
        open("/nonexistent/dir/file.bin", "rb")

    assert _common.run_cli(missing, [], "prog.py") == 1
    assert capsys.readouterr().err == "prog.py: error: /nonexistent/dir/file.bin: No such file or directory\n"
