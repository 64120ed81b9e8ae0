"""Shared pieces of the preprocessing scripts: atomic output files, disk-backed arrays, NCHW ``.pth`` writing
and the command-line error handling.

Every dataset file is a uint8 ``[N, C, H, W]`` tensor saved with :func:`torch.save` (zip format), which the
training code memory-maps. The largest (ImageNet 64x64 train) is 15.7 GB, so nothing here holds a whole
dataset in memory: images go into memory-mapped ``.npy`` files on disk, and :func:`torch.save` writes a
tensor that is backed by such a file.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import mmap
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

# Arrays are copied and written in pieces of about this many bytes: large enough to keep numpy and the
# disk busy, small enough that memory use does not depend on the dataset's size.
CHUNK_BYTES = 32 * 1024 * 1024


# Exit status for an unexpected exception (a bug), as sysexits.h's EX_SOFTWARE.
EXIT_BUG = 70


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with status 2, as train_img.py."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class InputError(Exception):
    """Bad input (missing file, wrong format, corrupt data): reported as one line, without a traceback."""


# errno values that mean "no room left": a full disk or an exhausted quota.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

# Room for torch.save's zip container around the tensor bytes (headers, the pickle, alignment).
PTH_OVERHEAD = 64 * 1024


def disk_full_error(folder: str, needed: int, what: str) -> InputError:
    """The one-line "disk full" error: what needed how much room in ``folder``, and how much is free."""
    try:
        available = shutil.disk_usage(folder).free
        free = (f"only {human_bytes(available)} is free" if available < needed else
                f"the disk refused it although {human_bytes(available)} is reported free (a quota?)")
    except OSError:
        free = "the free space could not be read"
    return InputError(f"disk full: {what} needs {human_bytes(needed)} of free space in {folder}, but {free}; "
                      "free some space or write the output to another disk")


def check_free_space(folder: str, needed: int, what: str) -> None:
    """Fails at once, with :func:`disk_full_error`, if ``folder``'s disk has less than ``needed`` bytes free.

    A check before hours of work; the files themselves are also reserved when created (:func:`reserve`).
    """
    os.makedirs(folder, exist_ok=True)
    if shutil.disk_usage(folder).free < needed:
        raise disk_full_error(folder, needed, what)


def reserve(fd: int, nbytes: int, folder: str, what: str) -> None:
    """Allocates ``nbytes`` of disk for the open file ``fd`` (``os.posix_fallocate``; the file grows to that size).

    A memory-mapped file whose pages have no disk blocks behind them kills the process with SIGBUS when the
    disk fills up while they are written, with no message and no clean-up. Reserving the blocks first turns
    a full disk into an ordinary error here, before any work is done. Where the filesystem cannot reserve
    space (or the platform lacks posix_fallocate) this does nothing.
    """
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise disk_full_error(folder, nbytes, what) from None
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # e.g. some network filesystems: carry on without the reservation
        raise


def _no_space_error(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError behind ``exc`` (itself or in its cause/context chain), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def human_bytes(n: float) -> str:
    """``n`` bytes as a short size in decimal units (as disks are sold), e.g. ``3.9 GB``."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _fsync_dir(folder: str) -> None:
    # The rename itself must reach the disk too, or a crash could leave the old file (or none) in place.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def temp_path(folder: str, name: str, suffix: str = ".tmp") -> Iterator[str]:
    """A fresh file name in ``folder`` (so renames stay on one filesystem), removed on exit if still there."""
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on success the file is fsynced and renamed to ``path``.

    Readers therefore see either the old complete file or the new complete one, never a half-written file,
    even if the script is killed or the disk fills up; on failure the temporary file is removed.
    """
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    with temp_path(folder, name) as tmp:
        yield tmp
        # mkstemp makes the file private (0600); give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)


def open_memmap(path: str, shape: Tuple[int, ...], what: str = "") -> np.memmap:
    """A new uint8 ``.npy`` file of ``shape`` at ``path``, memory-mapped for writing, its disk space reserved.

    ``what`` describes the file in a "disk full" error (default: its name).
    """
    folder = os.path.dirname(os.path.abspath(path))
    what = what or f"writing {os.path.basename(path)}"
    nbytes = int(np.prod(shape))
    try:
        # The header is written like numpy does it, then the whole file is reserved before it is mapped:
        # writing into an unreserved mapping on a full disk ends in SIGBUS (see reserve()).
        with open(path, "w+b") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
            offset = f.tell()
            reserve(f.fileno(), offset + nbytes, folder, what)
            f.truncate(offset + nbytes)  # where posix_fallocate is unavailable: a sparse file, as before
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise disk_full_error(folder, nbytes, what) from None
        raise
    return np.memmap(path, dtype=np.uint8, mode="r+", offset=offset, shape=tuple(shape))


def flush_memmap(array: np.memmap) -> None:
    """Writes a memory-mapped array's pages to its file, so an ``os.replace`` that follows is durable."""
    array.flush()
    with open(array.filename, "rb+") as f:
        os.fsync(f.fileno())


def release_pages(arr: np.ndarray) -> None:
    """Drops the pages of a memory-mapped array (or slice) from this process's resident set; Linux only.

    Pages of a file mapping count as the process's memory (RSS) for as long as they stay mapped, so the long
    decode and copy passes over a 15 GB file would look like 15 GB of RSS although it is only page cache.
    Once a chunk is done we tell the kernel so: the data stays in the file (shared mappings write dirty pages
    back as usual), RSS stays at about one chunk, and touching the pages again just maps them back. A no-op
    for plain arrays and copy-on-write memmaps, where dropping pages would lose data.
    """
    mm = getattr(arr, "_mmap", None)  # numpy's memmap (and its slices) keep their mmap.mmap here
    if (mm is None or getattr(arr, "mode", "c") == "c" or not hasattr(mmap, "MADV_DONTNEED")
            or arr.size == 0 or not arr.flags.c_contiguous):
        return
    start = arr.ctypes.data - _address(mm)
    end = start + arr.nbytes
    lo, hi = start - start % mmap.PAGESIZE, min(len(mm), end + (-end) % mmap.PAGESIZE)
    if 0 <= lo < hi:
        with contextlib.suppress(OSError):  # only an optimisation: never fail a conversion over it
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _address(buffer) -> int:
    """Memory address of a buffer (such as an mmap), through a zero-copy numpy view."""
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def chunk_ranges(n: int, item_bytes: int) -> Iterator[Tuple[int, int]]:
    """``[start, stop)`` ranges over ``n`` items of ``item_bytes`` each, about :data:`CHUNK_BYTES` a piece."""
    step = max(1, CHUNK_BYTES // max(1, item_bytes))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def nhwc_to_nchw(src: np.ndarray, dst: np.ndarray, max_value: int = 255, name: str = "", desc: str = "") -> None:
    """Copies NHWC images ``src`` into the NCHW array ``dst`` chunk by chunk, checking levels <= ``max_value``.

    Both arrays may be memory-mapped files: only one chunk is in memory at a time. The range check rides on
    the copy so that a huge input is read once, not twice. Raises :class:`InputError` naming ``name`` and the
    first image with a level above ``max_value``.
    """
    n = src.shape[0]
    item_bytes = int(np.prod(src.shape[1:]))
    with tqdm(total=n, desc=desc or "NHWC -> NCHW", unit="img", dynamic_ncols=True) as bar:
        for start, stop in chunk_ranges(n, item_bytes):
            chunk = src[start:stop]
            if max_value < 255:
                peak = chunk.reshape(stop - start, -1).max(axis=1)
                bad = np.flatnonzero(peak > max_value)
                if bad.size:
                    i = int(bad[0])
                    raise InputError(
                        f"{name}: levels must be in 0..{max_value} (--max-value {max_value}), but image {start + i} "
                        f"has a level of {int(peak[i])}")
            # numpy copies the transposed view straight into the destination file's pages, no temporary.
            dst[start:stop] = chunk.transpose(0, 3, 1, 2)
            release_pages(chunk)
            release_pages(dst[start:stop])
            bar.update(stop - start)


class _ProgressWriter:
    """File-like wrapper that shows :func:`torch.save`'s progress.

    torch hands the whole tensor storage to ``write`` in one call (a memoryview of the memory-mapped file);
    writing it in slices lets a progress bar move and costs no copy.
    """

    def __init__(self, f, bar: tqdm):
        self.f, self.bar = f, bar

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK_BYTES):
            piece = view[start : start + CHUNK_BYTES]
            self.f.write(piece)
            # The zip container adds a few hundred bytes of its own; keep the bar at the tensor's size.
            self.bar.update(min(len(piece), self.bar.total - self.bar.n))
        return len(view)

    def flush(self) -> None:
        self.f.flush()


def save_tensor(tensor: torch.Tensor, path: str, desc: str = "") -> None:
    """``torch.save`` of ``tensor`` to ``path`` atomically (temporary file, flush, fsync, ``os.replace``)."""
    import torch  # imported here, not at the top: it takes seconds, and bad input should fail at once
    nbytes = tensor.numel() * tensor.element_size()
    folder, name = os.path.split(os.path.abspath(path))
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        reserve(f.fileno(), nbytes + PTH_OVERHEAD, folder, f"writing {name}")
        try:
            with tqdm(total=nbytes, desc=desc or f"write {os.path.basename(path)}", unit="B", unit_scale=True,
                      unit_divisor=1024, dynamic_ncols=True) as bar:
                torch.save(tensor, _ProgressWriter(f, bar))
            f.flush()
        except (OSError, RuntimeError) as e:
            # torch reports a failed write as RuntimeError("... unexpected pos ...") with the OSError only as
            # its context: name the real cause.
            if _no_space_error(e) is not None:
                raise disk_full_error(folder, nbytes + PTH_OVERHEAD, f"writing {name}") from None
            raise
        f.truncate(f.tell())  # drop the unused end of the reservation
        # atomic_output fsyncs and renames once the file is closed


def save_nchw_pth(nchw: np.ndarray, path: str, desc: str = "") -> None:
    """Saves a uint8 NCHW array (typically a memmap) as a ``.pth`` tensor without copying it into memory."""
    import torch

    # torch.from_numpy shares the memmap's pages, so torch.save streams the file's contents to the output.
    # The memmap is opened read-write (mode "w+"/"r+") because torch warns about read-only numpy arrays.
    # torch.save first reads the whole storage for the zip entry's CRC-32: that maps every page of the file
    # at once, so the process's RSS grows by the file's size for a while. Those are page-cache pages that
    # the kernel reclaims under memory pressure, not a copy in the process's own memory.
    save_tensor(torch.from_numpy(nchw), path, desc)


def npy_nhwc_to_pth(src: np.ndarray, pth_path: str, max_value: int = 255, name: str = "",
                    desc: str = "") -> None:
    """NHWC uint8 images (an array or memmap) -> NCHW tensor at ``pth_path``, through a temporary NCHW file.

    The temporary file lives next to the output (same disk) and is deleted afterwards, so this needs about
    twice the output's size of free disk space while it runs.
    """
    n, h, w, c = src.shape
    folder, base = os.path.split(os.path.abspath(pth_path))
    check_free_space(folder, 2 * src.nbytes + PTH_OVERHEAD, f"writing {base} (a temporary NCHW copy, then the .pth)")
    with temp_path(folder, base, ".nchw.npy") as tmp:
        nchw = open_memmap(tmp, (n, c, h, w), f"the temporary NCHW copy for {base}")
        try:
            nhwc_to_nchw(src, nchw, max_value, name, desc=f"{desc or base}: NHWC -> NCHW")
            nchw.flush()
            save_nchw_pth(nchw, pth_path, desc=f"{desc or base}: write .pth")
        finally:
            del nchw  # unmap before the temporary file is removed


def run_cli(main_impl: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]], prog: str) -> int:
    """Runs ``main_impl(argv)`` and turns expected failures into a one-line message and an exit code.

    0: success; 1: bad input or an I/O error (message names the file); 130: interrupted (Ctrl-C or SIGTERM);
    :data:`EXIT_BUG`: any other exception, which is a bug: its traceback is printed, then a line saying so.
    """
    # SIGTERM (kill, a batch system's time limit) would end Python without running `finally` blocks; as an
    # exception it lets the temporary files be removed like on Ctrl-C.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        main_impl(argv)
    except InputError as e:
        _error(prog, str(e))
        return 1
    except OSError as e:  # missing/unreadable input, full disk, permissions
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        full = "disk full: " if e.errno in _NO_SPACE else ""
        _error(prog, f"{where}{full}{e.strerror or e}")
        return 1
    except MemoryError:
        _error(prog, "out of memory")
        return 1
    except KeyboardInterrupt:
        _error(prog, "interrupted; no output file was left half-written")
        return 130
    except Exception:  # a bug: keep the traceback, and say so
        traceback.print_exc()
        _error(prog, "internal error (the traceback above); this is a bug in resflows, please report it with "
                     "the command you ran")
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _error(prog: str, message: str) -> None:
    # Whitespace is collapsed so that a message quoting another error (numpy, PIL) stays on one line.
    sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
    sys.stderr.flush()


def format_list(items: List[str], limit: int = 3) -> str:
    """``a, b, c and 4 more`` for error messages that must stay on one line."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
