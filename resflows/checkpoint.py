"""Checkpoints: our safe format, and the paper's format through a guarded reader (:mod:`resflows.legacy`).

Our format is a plain dict of tensors, state_dicts and primitives that loads with
``torch.load(weights_only=True)``::

    {'format': 'resflows', 'format_version': 1,
     'config': TrainConfig as a dict, 'model_config': ModelConfig as a dict,
     'model': state_dict, 'ema': state_dict or None, 'optimizer': ..., 'scheduler': ... or None,
     'epoch': int, 'batch_in_epoch': int, 'itr': int, 'step': int, 'world_size': int,
     'best_test_bpd': float or None, 'last_test_bpd': float or None,
     'best': [[test bpd, epoch, 'checkpt-EPOCH.pth'], ...] (up to 5, best first; the name is informative only:
              the clean-up finds a run's files by epoch, in its own folder),
     'rng': {'torch': ByteTensor, 'cuda': [ByteTensor, ...], 'python': tuple} or {'per_rank': [...]}}

Writes are atomic (:mod:`resflows.atomic`), so a crash never leaves a truncated checkpoint behind. What a
checkpoint holds is checked before any of it is used (:mod:`resflows.checkpoint_checks`); models are built
from checkpoints by :mod:`resflows.loading`.
"""
from __future__ import annotations

import importlib
import os
import random
import zipfile
from typing import Any, Dict, List, Tuple

import torch

from .atomic import TMP_PREFIX, atomic_write, write_json
from .config import ConfigError, TrainConfig
from .legacy import NotACheckpointError, check_structure, check_zip_archive, load_paper_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "NonFiniteError",
    "nonfinite_tensors",
    "atomic_save",
    "save_checkpoint",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    # kept importable from here: defined in resflows.atomic, and (lazily, see _MOVED) elsewhere
    "TMP_PREFIX",
    "atomic_write",
    "write_json",
]

# Names that lived here before the module was split, imported on first use (they import this module).
_MOVED = {"check_weights_fit": "checkpoint_checks", "load_model": "loading", "load_weights": "loading",
          "load_state": "loading"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class NonFiniteError(CheckpointError):
    """Weights (or optimiser state) holding NaN or infinity, which no checkpoint may contain."""


def nonfinite_tensors(obj: Any, prefix: str = "") -> List[str]:
    """Names of the floating-point tensors anywhere in ``obj`` (nested dicts, lists, tuples) that hold a
    NaN or an infinity. One host transfer per device, not one per tensor."""
    found: List[Tuple[str, torch.Tensor]] = []

    def walk(o: Any, name: str) -> None:
        if isinstance(o, torch.Tensor):
            if (o.is_floating_point() or o.is_complex()) and o.numel() and not o.is_meta:
                found.append((name, o))
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(obj, prefix)
    by_device: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}
    for name, t in found:
        by_device.setdefault(t.device, []).append((name, t))
    bad: List[str] = []
    for items in by_device.values():
        flags = torch.stack([torch.isfinite(t).all() for _, t in items]).cpu().tolist()
        bad.extend(name for (name, _), ok in zip(items, flags) if not ok)
    return bad


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` with :func:`atomic_write`.

    Refuses (:class:`NonFiniteError`) to write any object holding a non-finite floating-point tensor, so
    no checkpoint ever holds NaN or infinite weights; the file already at ``path`` is then kept."""
    bad = nonfinite_tensors(obj)
    if bad:
        raise NonFiniteError(f"refusing to write {path}: {len(bad)} tensor(s) hold NaN or infinite values "
                             f"(first: {bad[0]}); the files already there are kept")
    atomic_write(path, lambda f: torch.save(obj, f), ".pth")


def rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write a checkpoint in our format; ``state`` holds the fields listed in the module docstring."""
    payload = {"format": "resflows", "format_version": FORMAT_VERSION}
    payload.update(state)
    atomic_save(payload, path)


def read_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read our format or the paper's, returning our layout (``format`` says which it was).

    Raises :class:`CheckpointError` with a one-line message for a missing, truncated, damaged (a zip entry
    whose CRC-32 does not match), crafted or foreign file. A zip archive's declared sizes are checked before
    anything is unpacked, and what the file holds (structure, types, ranges) before any of it is used.
    """
    from .checkpoint_checks import validated

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if zipfile.is_zipfile(path):
        try:
            check_zip_archive(path)
        except NotACheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception:  # noqa: BLE001 - not loadable safely: maybe the paper's pickled format
            obj = None
        if isinstance(obj, dict) and obj.get("format") == "resflows":
            try:
                check_structure(obj)
            except NotACheckpointError as e:
                raise CheckpointError(f"{path}: damaged or crafted checkpoint: {e}") from None
            version = obj.get("format_version", 0)
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise CheckpointError(f"{path}: damaged checkpoint (its format_version is {version!r:.40}, not an integer)")
            if version > FORMAT_VERSION:
                raise CheckpointError(f"{path}: written by a newer resflows (format {obj['format_version']}); upgrade resflows")
            for key in ("config", "model_config", "model"):
                if key not in obj:
                    raise CheckpointError(f"{path}: damaged resflows checkpoint (no {key!r})")
            if isinstance(obj["config"], dict) and obj["config"].get("imagesize", 0) is None:
                # Written when a missing --imagesize meant the native size (28 for mnist), now 32: keep its size.
                try:
                    obj["config"]["imagesize"] = int(obj["model_config"]["input_size"][-1])
                except (TypeError, ValueError, KeyError, IndexError):
                    raise CheckpointError(f"{path}: damaged checkpoint (its model_config has no usable input_size)") from None
            return validated(path, obj)
        if isinstance(obj, dict) and obj.get("format") == "resflows-toy":
            raise CheckpointError(f"{path}: a train_toy.py checkpoint; load it with resflows.toy.load_toy_model")
        if obj is not None:
            raise CheckpointError(f"{path}: not a Residual Flows image checkpoint (no model, flags and weights in it)")
    elif not _looks_like_legacy_torch(path):
        raise CheckpointError(f"{path}: not a checkpoint (neither a torch zip archive nor a legacy torch file; truncated?)")
    try:
        paper = load_paper_checkpoint(path, verify=False)  # the zip archive was checked above
    except NotACheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        config = TrainConfig.from_paper_args(paper["args"])
        from .factory import model_config_from

        model_config = model_config_from(config)
    except (ConfigError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path}: its saved flags do not describe a model we can build ({e})") from None
    sd = {k: _to(v, map_location) for k, v in paper["state_dict"].items()}
    ema = None
    if paper["ema"] is not None:
        ema = dict(sd)
        ema.update({k: _to(v, map_location) for k, v in paper["ema"].items() if k in ema})
    return validated(path, {
        "format": "paper",
        "format_version": 0,
        "config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "model": sd,
        "ema": ema,
        "optimizer": paper["optimizer_state_dict"],
        "scheduler": None,
        "epoch": paper.get("begin_epoch"),
        "itr": paper.get("begin_iter"),
        "best_test_bpd": paper["test_bpd"],
        "last_test_bpd": paper["test_bpd"],
        "rng": None,
    })


def _to(t: torch.Tensor, map_location: Any) -> torch.Tensor:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return t
    return t.to(map_location)


def _looks_like_legacy_torch(path: str) -> bool:
    # Legacy torch files start with a pickled magic number: protocol-2 PROTO opcode then a LONG1.
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and head[0] == 0x80 and head[2] == 0x8A


