"""What the entry points (``train_img.py``, ``train_toy.py``) share around a run: one-line errors, the lock
on the ``--save`` folder, and cleaning what a killed run left behind.

Every failure a user can cause (a bad flag, a missing or damaged file, a full disk, too little memory, a
second run in the same folder) ends in one line naming the flag or file and what to do. Anything else is a
bug: its traceback is printed, followed by a line saying so.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import socket
import sys
import traceback
from typing import Callable, Iterable, Optional

import torch

__all__ = ["run_entry_point", "describe_error", "SaveLock", "remove_leftovers"]

logger = logging.getLogger("resflows")

EXIT_USER_ERROR = 1
_OOM = getattr(torch, "OutOfMemoryError", MemoryError)  # torch >= 2.5; CUDA allocations
EXIT_BUG = 3
EXIT_INTERRUPTED = 130


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .runlog import TrainingError

    # DataNotFoundError is a FileNotFoundError, hence an OSError.
    return (ConfigError, CheckpointError, TrainingError, OSError, MemoryError, _OOM)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, _OOM)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def describe_error(e: BaseException) -> str:
    """One line for a user error."""
    if _out_of_memory(e):
        return ("out of memory while building or running the model; use a smaller --batchsize, --idim or "
                "--nblocks (or free memory on the device)")
    if isinstance(e, OSError) and not type(e).__module__.startswith("resflows"):
        what = e.strerror or str(e) or type(e).__name__
        if e.errno == errno.ENOSPC:
            what += " (the disk is full: free space there and run again; nothing already written was lost)"
        return f"{e.filename}: {what}" if e.filename else what
    text = " ".join(str(e).split())  # one line, whatever the message held
    return text or type(e).__name__


def run_entry_point(prog: str, run: Callable[[], int]) -> int:
    """Call ``run()``; user errors become ``PROG: error: ...`` on stderr (exit 1), Ctrl-C a short notice
    (exit 130), and anything else its traceback plus a line asking for a bug report (exit 3)."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if isinstance(e, _user_errors()) or _out_of_memory(e):
            print(f"{prog}: error: {describe_error(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"{prog}: internal error ({type(e).__name__}): this is a bug in resflows; please report it with the "
              f"command line and the traceback above", file=sys.stderr)
        return EXIT_BUG


class SaveLock:
    """An exclusive lock on a ``--save`` folder, held for the whole run, so that two runs cannot overwrite
    each other's checkpoints.

    ``SAVE/.lock`` is locked with ``flock``: the kernel releases it when the process ends, however it ends,
    so a lock left by a killed run is never mistaken for a live one. The file records the holder's PID and
    host for the message the second run prints.
    """

    NAME = ".lock"

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, self.NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "SaveLock":
        from .config import ConfigError

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self._holder()
            raise ConfigError(f"--save {self.folder} is in use by another run{holder}; wait for it to finish, stop it, "
                              f"or choose another --save") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                pid, host = (f.read().split() + ["?", "?"])[:2]
            return f" (PID {pid} on {host})"
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # the file stays (removing it would race with a new holder)
            finally:
                os.close(self._fd)  # closing the descriptor releases the flock
                self._fd = None

    def __enter__(self) -> "SaveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(folders: Iterable[str], keep_checkpoints: Optional[Iterable[str]] = None,
                     pattern: str = "checkpt-*.pth") -> None:
    """Delete what a run killed between two writes left behind, under the ``--save`` lock: the hidden
    temporary files of interrupted saves, and (when ``keep_checkpoints`` is given: the names the resumed
    checkpoint lists as its best) any ``pattern`` checkpoint beyond those."""
    from .atomic import TMP_PREFIX

    keep = None if keep_checkpoints is None else {os.path.basename(p) for p in keep_checkpoints}
    for folder in folders:
        stale = glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*.pth"))
        if keep is not None:
            stale += [p for p in glob.glob(os.path.join(glob.escape(folder), pattern)) if os.path.basename(p) not in keep]
        for path in sorted(stale):
            try:
                os.remove(path)
                logger.info("removed %s, left behind by an interrupted run", path)
            except FileNotFoundError:
                pass
