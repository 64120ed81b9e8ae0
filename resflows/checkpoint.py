"""Checkpoints: our safe format, the paper's format through a guarded reader, and ``load_model``.

Our format is a plain dict of tensors, state_dicts and primitives that loads with
``torch.load(weights_only=True)``::

    {'format': 'resflows', 'format_version': 1,
     'config': TrainConfig as a dict, 'model_config': ModelConfig as a dict,
     'model': state_dict, 'ema': state_dict or None, 'optimizer': ..., 'scheduler': ... or None,
     'epoch': int, 'itr': int, 'best_test_bpd': float or None, 'last_test_bpd': float or None,
     'rng': {'torch': ByteTensor, 'cuda': [ByteTensor, ...], 'python': tuple}}

Writes are atomic (:func:`atomic_write`: temporary file in the same folder, flush, fsync, rename), so a
crash never leaves a truncated checkpoint or JSON file behind.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import zipfile
from typing import Any, BinaryIO, Callable, Dict, List, Tuple

import torch

from .config import ConfigError, ModelConfig, TrainConfig
from .legacy import NotACheckpointError, load_paper_checkpoint
from .optim import EMA

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "NonFiniteError",
    "nonfinite_tensors",
    "check_weights_fit",
    "atomic_write",
    "atomic_save",
    "write_json",
    "save_checkpoint",
    "read_checkpoint",
    "load_model",
    "load_weights",
    "rng_state",
    "set_rng_state",
]

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


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` with :func:`atomic_write`.

    Refuses (:class:`NonFiniteError`) to write any object holding a non-finite floating-point tensor, so
    no checkpoint ever holds NaN or infinite weights; the file already at ``path`` is then kept."""
    bad = nonfinite_tensors(obj)
    if bad:
        raise NonFiniteError(f"refusing to write {path}: {len(bad)} tensor(s) hold NaN or infinite values "
                             f"(first: {bad[0]}); the files already there are kept")
    atomic_write(path, lambda f: torch.save(obj, f), ".pth")


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and infinity refused: they are not JSON) with :func:`atomic_write`."""
    text = json.dumps(obj, indent=2, allow_nan=False)  # ValueError before anything is written
    atomic_write(path, lambda f: f.write((text + "\n").encode()), ".json")


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

    Raises :class:`CheckpointError` with a one-line message for a missing, truncated or foreign file.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if zipfile.is_zipfile(path):
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception:  # noqa: BLE001 - not loadable safely: maybe the paper's pickled format
            obj = None
        if isinstance(obj, dict) and obj.get("format") == "resflows":
            if obj.get("format_version", 0) > FORMAT_VERSION:
                raise CheckpointError(f"{path}: written by a newer resflows (format {obj['format_version']}); upgrade resflows")
            for key in ("config", "model_config", "model"):
                if key not in obj:
                    raise CheckpointError(f"{path}: damaged resflows checkpoint (no {key!r})")
            if isinstance(obj["config"], dict) and obj["config"].get("imagesize", 0) is None:
                # Written when a missing --imagesize meant the native size (28 for mnist), now 32: keep its size.
                obj["config"]["imagesize"] = int(obj["model_config"]["input_size"][-1])
            return _validated(path, obj)
        if isinstance(obj, dict) and obj.get("format") == "resflows-toy":
            raise CheckpointError(f"{path}: a train_toy.py checkpoint; load it with resflows.toy.load_toy_model")
        if obj is not None:
            raise CheckpointError(f"{path}: not a Residual Flows image checkpoint (no model, flags and weights in it)")
    elif not _looks_like_legacy_torch(path):
        raise CheckpointError(f"{path}: not a checkpoint (neither a torch zip archive nor a legacy torch file; truncated?)")
    try:
        paper = load_paper_checkpoint(path)
    except NotACheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        config = TrainConfig.from_paper_args(paper["args"])
        from .factory import model_config_from

        model_config = model_config_from(config)
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its saved flags do not describe a model we can build ({e})") from None
    sd = {k: _to(v, map_location) for k, v in paper["state_dict"].items()}
    ema = None
    if paper["ema"] is not None:
        ema = dict(sd)
        ema.update({k: _to(v, map_location) for k, v in paper["ema"].items() if k in ema})
    return _validated(path, {
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


_COUNTERS = ("epoch", "batch_in_epoch", "itr", "step", "world_size")


def _validated(path: str, ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Check everything a checkpoint feeds into a run before anything is built from it: the stored flags
    (types and ranges, the same rules as the command line), the counters, that the weights are tensors
    that are finite and fit the stored architecture. A crafted or damaged file gets one line."""
    from .cli import validate_config

    for key in ("config", "model_config"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: damaged checkpoint (its {key!r} is a {type(ckpt.get(key)).__name__}, not a dict of settings)")
    try:
        config = TrainConfig.from_dict(ckpt["config"])
        validate_config(config)
        model_config = ModelConfig.from_dict(ckpt["model_config"])
    except (ConfigError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path}: its stored settings are invalid: {e}") from None
    ckpt = dict(ckpt, config=config.to_dict(), model_config=model_config.to_dict())
    for key in _COUNTERS:
        v = ckpt.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise CheckpointError(f"{path}: damaged checkpoint (its {key} counter is {v!r}, not a non-negative integer)")
    best = ckpt.get("best") or []
    if not isinstance(best, (list, tuple)) or not all(
            isinstance(b, (list, tuple)) and len(b) == 3 and isinstance(b[0], (int, float)) and isinstance(b[1], int)
            and isinstance(b[2], str) for b in best):
        raise CheckpointError(f"{path}: damaged checkpoint (its list of best checkpoints is malformed)")
    for key in ("model", "ema"):
        sd = ckpt.get(key)
        if sd is None and key == "ema":
            continue
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise CheckpointError(f"{path}: damaged checkpoint (its {key!r} weights are not a dict of named tensors)")
        bad = nonfinite_tensors(sd)
        if bad:
            raise NonFiniteError(f"{path}: its {'EMA' if key == 'ema' else key} weights hold NaN or infinite values "
                                 f"({len(bad)} tensor(s), first: {bad[0]}); use an earlier checkpoint")
    check_weights_fit(path, ckpt, model_config)
    return ckpt


def check_weights_fit(path: str, ckpt: Dict[str, Any], model_config: ModelConfig) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's weights (and EMA) have exactly the keys and
    shapes of the model ``model_config`` describes. The model is built on the ``meta`` device (no memory,
    no power iterations), after a count that rejects absurd block numbers before building anything."""
    from .model import ResidualFlow

    sd = ckpt["model"]
    blocks = sum(model_config.nblocks) + (model_config.fc_nblocks if model_config.fc_end else 0)
    if blocks > len(sd):  # every block owns at least one tensor
        raise CheckpointError(f"{path}: its settings ask for {blocks} blocks but it holds only {len(sd)} weight tensors; "
                              f"the file is damaged")
    try:
        with torch.device("meta"):
            reference = ResidualFlow(model_config).state_dict()
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from None
    for what, weights in (("model", sd), ("EMA", ckpt.get("ema"))):
        if weights is None:
            continue
        missing = [k for k in reference if k not in weights]
        unexpected = [k for k in weights if k not in reference]
        wrong = [k for k in reference if k in weights and tuple(weights[k].shape) != tuple(reference[k].shape)]
        if missing or unexpected or wrong:
            detail = []
            if missing:
                detail.append(f"{len(missing)} missing, e.g. {missing[0]}")
            if unexpected:
                detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
            if wrong:
                k = wrong[0]
                detail.append(f"{len(wrong)} of the wrong shape, e.g. {k}: {list(weights[k].shape)} in the file, "
                              f"{list(reference[k].shape)} in the model")
            raise CheckpointError(f"{path}: its {what} weights do not fit this architecture ({'; '.join(detail)})")


def _to(t: torch.Tensor, map_location: Any) -> torch.Tensor:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return t
    return t.to(map_location)


def _looks_like_legacy_torch(path: str) -> bool:
    # Legacy torch files start with a pickled magic number: protocol-2 PROTO opcode then a LONG1.
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and head[0] == 0x80 and head[2] == 0x8A


def _build(path: str, ckpt: Dict[str, Any]):
    from .model import ResidualFlow

    try:
        mcfg = ModelConfig.from_dict(ckpt["model_config"])
        return ResidualFlow(mcfg)
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from None


def load_state(path: str, model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the file.

    Two entries are taken from ``model`` instead of the file, as the paper's code does: ``last_n_samples``
    when ``--n-samples`` changed (a record of the last draws, sized by it), and the constant Normalize
    statistics that checkpoints written before they became state lack.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    for k, v in own.items():
        if k.endswith("last_n_samples") and k in state_dict and state_dict[k].shape != v.shape:
            state_dict[k] = v
        elif k.endswith((".mean", ".std")) and k not in state_dict and k.startswith(("init_layer.", "transforms.0.chain.0.")):
            state_dict[k] = v
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(s.strip() for s in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(f"{path}: its {what} weights do not fit this architecture ({detail})") from None


def load_model(path: str, ema: bool = False, map_location: Any = "cpu"):
    """The model stored in a checkpoint (ours or the paper's), in eval mode, architecture taken from the file.

    With ``ema=True`` the exponential-moving-average weights are used and every normalised layer's
    power-iteration vectors are re-estimated to convergence for those weights.
    """
    ckpt = read_checkpoint(path, map_location)
    model = _build(path, ckpt)
    if ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: has no EMA weights; load it with ema=False")
        load_state(path, model, ckpt["ema"], "EMA")
    else:
        load_state(path, model, ckpt["model"])
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    if ema:
        from .evaluation import tighten_lipschitz

        tighten_lipschitz(model)
    return model.eval()


def load_weights(path: str, ckpt: Dict[str, Any], model: torch.nn.Module) -> EMA:
    """Load a checkpoint's weights into ``model`` and return the EMA: the checkpoint's EMA weights, or a copy
    of ``model`` where it has none."""
    load_state(path, model, ckpt["model"])
    ema = EMA(model)
    if ckpt.get("ema") is not None:
        load_state(path, ema.model, ckpt["ema"], "EMA")
    return ema
