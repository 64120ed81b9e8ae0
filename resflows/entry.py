"""What the entry points (``train_img.py``, ``train_toy.py``) share around a run: one-line errors, the
``--save`` folder (created and checked, locked), and cleaning what a killed run left behind.

Every failure a user can cause (a bad flag, a missing or damaged file, a full disk, too little memory, a
second run in the same folder) ends in one line naming the flag or file and what to do. Anything else is a
bug: its traceback is printed, followed by a line saying so.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import stat
import sys
import traceback
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = ["run_entry_point", "describe_error", "prepare_save_dir", "SaveLock", "remove_leftovers", "best_checkpoint_name",
           "remove_own_file"]

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


def prepare_save_dir(path: str, subfolders: Sequence[str] = ()) -> str:
    """Create ``--save`` (with parents and ``subfolders``); fail with one line if it cannot be written."""
    from .config import ConfigError

    if not path:
        raise ConfigError("--save is empty; give an output folder, e.g. --save experiments/run1")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--save {path} is a file, not a folder")
    try:
        for sub in list(subfolders) or [""]:
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--save {path} is not writable ({e.strerror or e})") from None
    return path


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


# The best-epoch checkpoints a run writes in SAVE/models: the only checkpoint names the clean-up removes.
BEST_CHECKPOINT = re.compile(r"checkpt-(\d{4,})\.pth")


def best_checkpoint_name(epoch: int) -> str:
    """``checkpt-EPOCH.pth``, the file name of an epoch among the best (``SAVE/models``)."""
    return f"checkpt-{int(epoch):04d}.pth"


def _deletable_folder(folder: str) -> bool:
    # Never delete through a symlinked folder: its files belong to wherever it points.
    return os.path.isdir(folder) and not os.path.islink(folder)


def remove_own_file(folder: str, name: str) -> bool:
    """Remove ``folder/name`` if it is a regular file (not a symlink, not a folder) directly in ``folder``
    and ``folder`` is not itself a symlink; ``name`` must be a bare file name. Returns whether it was removed.

    This is the one way the clean-up deletes: by a name this run's scheme produces, never by a path read
    from a file, so nothing outside the folder can be reached."""
    if os.path.basename(name) != name or name in ("", ".", "..") or not _deletable_folder(folder):
        return False
    path = os.path.join(folder, name)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def remove_leftovers(folders: Iterable[str], keep_checkpoints: Optional[Iterable[str]] = None) -> None:
    """Delete what a run killed between two writes left behind, under the ``--save`` lock: the hidden
    temporary files of interrupted saves (``.tmp-*.pth``), and (when ``keep_checkpoints`` is given: the epoch
    file names the resumed checkpoint of this folder lists as its best) any ``checkpt-EPOCH.pth`` beyond
    those. Only regular files directly in each folder whose names this scheme produces are removed."""
    from .atomic import TMP_PREFIX

    keep = None if keep_checkpoints is None else set(keep_checkpoints)
    for folder in folders:
        if not _deletable_folder(folder):
            continue
        for name in sorted(os.listdir(folder)):
            stale = (name.startswith(TMP_PREFIX) and name.endswith(".pth")) or (
                keep is not None and BEST_CHECKPOINT.fullmatch(name) is not None and name not in keep)
            if stale and remove_own_file(folder, name):
                logger.info("removed %s, left behind by an interrupted run", os.path.join(folder, name))
