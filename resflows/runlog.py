"""What every training loop shares around its steps: the ``resflows`` logger, progress bars, stop signals,
and the rule that stops a run whose loss stays non-finite (:class:`TrainingError`).

Used by the image trainer (:mod:`resflows.trainer`) and the toy trainer (:mod:`resflows.toy.train`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Iterator, Optional

__all__ = ["MAX_NONFINITE_STEPS", "TrainingError", "skipped_nonfinite_step", "setup_logger", "progress", "stop_on_signals",
           "DeferredStop"]

# Steps skipped in a row for a non-finite loss or gradient before the run gives up: one bad batch is
# noise, five in a row mean the weights have diverged.
MAX_NONFINITE_STEPS = 5


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss stayed non-finite); the message says what to do."""


def skipped_nonfinite_step(in_a_row: int, itr: int, advice: str) -> int:
    """The non-finite-step rule of both trainers, called when iteration ``itr``'s loss or gradient is
    non-finite and its step is skipped (the caller drops the gradients): say so, and after
    :data:`MAX_NONFINITE_STEPS` in a row raise :class:`TrainingError` ending in ``advice``. Returns the new
    count of skipped steps in a row (the caller resets it to 0 after a good step)."""
    in_a_row += 1
    logging.getLogger("resflows").warning("iteration %d: non-finite loss or gradient; step skipped (%d in a row)", itr, in_a_row)
    if in_a_row >= MAX_NONFINITE_STEPS:
        raise TrainingError(f"the loss was non-finite for {MAX_NONFINITE_STEPS} steps in a row (iteration {itr}); {advice}")
    return in_a_row


def setup_logger(save_dir: Optional[str], is_main: bool) -> logging.Logger:
    """Console and ``SAVE/logs`` logging (rank 0 only)."""
    log = logging.getLogger("resflows")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    if not is_main:
        log.addHandler(logging.NullHandler())
        return log
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if save_dir:
        fh = logging.FileHandler(os.path.join(save_dir, "logs"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


def progress(iterable, enabled: bool, **kw):
    """A tqdm bar over ``iterable``, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm import tqdm

    # Quiet when output is not a terminal (logs, CI), and on non-zero ranks.
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), leave=False, dynamic_ncols=True, **kw)


class DeferredStop:
    """SIGTERM / SIGINT outside the training loop (while a run starts, after its final save) are recorded
    instead of killing the process with status 143: a stop recorded before the loop is handed to it by
    :func:`stop_on_signals` (which saves at the end of the first step and stops, status 0, as the README
    promises), one after the final save changes nothing. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "DeferredStop":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def release(self) -> None:
        """The previous handlers again (e.g. for an evaluation, which a signal should simply end)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def stop_on_signals(trainer: Any, pending: Optional[DeferredStop] = None) -> Iterator[None]:
    """SIGTERM / SIGINT set ``trainer.stop_signal``, so that the loop saves at the next step and stops
    cleanly; a second SIGINT interrupts at once. A signal ``pending`` recorded during start-up counts."""
    if pending is not None and pending.signal and not trainer.stop_signal:
        trainer.stop_signal = pending.signal
    previous = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if trainer.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = name

    for s in (signal.SIGTERM, signal.SIGINT):
        previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
