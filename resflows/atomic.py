"""Atomic file writes: a crash never leaves a truncated file behind.

:func:`atomic_write` fills a temporary file in the same folder, flushes, fsyncs and renames it into place;
checkpoints (:func:`resflows.checkpoint.atomic_save`) and JSON results (:func:`write_json`) are written with it.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, BinaryIO, Callable

__all__ = ["TMP_PREFIX", "atomic_write", "write_json"]

TMP_PREFIX = ".tmp-"  # temporary files of interrupted writes start with it (see resflows.entry.remove_leftovers)


def atomic_write(path: str, write: Callable[[BinaryIO], Any], suffix: str = "") -> None:
    """Write ``path`` all or nothing: ``write(f)`` fills a temporary binary file beside it, which is flushed,
    fsynced and renamed into place, so a crash never leaves a truncated file behind.

    On any failure the file already at ``path`` is kept and the temporary file removed; an OSError (a full
    disk...) names ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # torch.save's writes do not say which file
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and infinity refused: they are not JSON) with :func:`atomic_write`."""
    text = json.dumps(obj, indent=2, allow_nan=False)  # ValueError before anything is written
    atomic_write(path, lambda f: f.write((text + "\n").encode()), ".json")
