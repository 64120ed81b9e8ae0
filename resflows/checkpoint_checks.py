"""Checks of what a checkpoint holds, run before anything is built from it: the stored flags (the same rules
as the command line), the counters, the list of best checkpoints, and that the weights are finite tensors
that fit the stored architecture (compared on the ``meta`` device). A crafted or damaged file gets one line
(:class:`resflows.checkpoint.CheckpointError`)."""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, Optional

import torch

from .checkpoint import CheckpointError, NonFiniteError, nonfinite_tensors
from .config import ConfigError, ModelConfig, TrainConfig, validate_config

__all__ = ["validated", "check_weights_fit", "check_fit_on_meta"]

_COUNTERS = ("epoch", "batch_in_epoch", "itr", "step", "world_size")
# Far beyond any run (10^12 steps), and small enough that seeds derived from a counter stay within 64 bits.
MAX_COUNTER = 10**12
MAX_BEST = 100  # entries in the list of best checkpoints (a run keeps 5)


def validated(path: str, ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Check everything a checkpoint feeds into a run before anything is built from it: the stored flags
    (types and ranges, the same rules as the command line), the counters, that the weights are tensors
    that are finite and fit the stored architecture. A crafted or damaged file gets one line."""
    for key in ("config", "model_config"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: damaged checkpoint (its {key!r} is a {type(ckpt.get(key)).__name__}, not a dict of settings)")
        odd = [k for k in ckpt[key] if not isinstance(k, str)]
        if odd:
            raise CheckpointError(f"{path}: damaged checkpoint (its {key!r} has a key that is not a setting name: {odd[0]!r})")
    try:
        config = TrainConfig.from_dict(ckpt["config"])
        validate_config(config)
        model_config = ModelConfig.from_dict(ckpt["model_config"])
    except (ConfigError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path}: its stored settings are invalid: {e}") from None
    ckpt = dict(ckpt, config=config.to_dict(), model_config=model_config.to_dict())
    for key in ("epoch", "itr", "step", "batch_in_epoch") if ckpt.get("format") == "resflows" else ():
        if ckpt.get(key) is None and (key in ckpt or key in ("epoch", "itr")):  # step, batch_in_epoch: newer fields
            raise CheckpointError(f"{path}: damaged checkpoint (no {key} counter)")
    for key in _COUNTERS:
        v = ckpt.get(key)
        if v is not None and (not _is_int(v) or not 0 <= v <= MAX_COUNTER or (key == "world_size" and v == 0)):
            raise CheckpointError(f"{path}: damaged checkpoint (its {key} counter is {_show(v)}, not an integer in "
                                  f"[{int(key == 'world_size')}, 10^12])")
    best = ckpt.get("best") or []
    if not isinstance(best, (list, tuple)) or len(best) > MAX_BEST or not all(
            isinstance(b, (list, tuple)) and len(b) == 3 and _is_real(b[0]) and math.isfinite(b[0])
            and _is_int(b[1]) and 0 <= b[1] <= MAX_COUNTER and isinstance(b[2], str) for b in best):
        raise CheckpointError(f"{path}: damaged checkpoint (its list of best checkpoints is malformed)")
    epochs = [b[1] for b in best]
    if len(set(epochs)) != len(epochs) or (epochs and ckpt.get("epoch") is not None and max(epochs) >= ckpt["epoch"]):
        # Each entry is a finished epoch, once: a repeated or future one would let the clean-up remove a listed file.
        raise CheckpointError(f"{path}: damaged checkpoint (its list of best checkpoints names epochs {sorted(epochs)}, "
                              f"repeated or not before its epoch {ckpt.get('epoch')})")
    for key in ("best_test_bpd", "last_test_bpd"):
        v = ckpt.get(key)
        if v is not None and not _is_real(v):
            raise CheckpointError(f"{path}: damaged checkpoint (its {key} is {_show(v)}, not a number)")
    if ckpt.get("best_test_bpd") is not None and not math.isfinite(ckpt["best_test_bpd"]):
        raise CheckpointError(f"{path}: damaged checkpoint (its best_test_bpd is {ckpt['best_test_bpd']}, not finite)")
    check_rng(path, ckpt.get("rng"))
    check_optimizer(path, ckpt.get("optimizer"))
    if ckpt.get("scheduler") is not None and not isinstance(ckpt["scheduler"], dict):
        raise CheckpointError(f"{path}: damaged checkpoint (its scheduler state is a {type(ckpt['scheduler']).__name__}, not a dict)")
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = repr(v) if not isinstance(v, int) or v.bit_length() <= 64 else f"an integer of {v.bit_length()} bits"
    return text if len(text) <= 40 else text[:37] + "..."


def check_rng(path: str, rng: Any) -> None:
    """The saved random streams (``{'torch', 'python', 'cuda'}``, or ``{'per_rank': [...]}`` from a
    multi-process run) must be states the generators accept: each is tried on a private generator, so a
    malformed one is refused while reading, before anything of the run is touched."""
    if rng is None:
        return
    if not isinstance(rng, dict):
        raise CheckpointError(f"{path}: damaged checkpoint (its random-number state is a {type(rng).__name__}, not a dict)")
    streams = rng.get("per_rank") if "per_rank" in rng else [rng]
    if not isinstance(streams, (list, tuple)) or not 1 <= len(streams) <= 2**20:
        raise CheckpointError(f"{path}: damaged checkpoint (its per-rank random-number states are not a list)")
    for state in streams:
        try:
            _try_rng(state)
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError) as e:
            raise CheckpointError(f"{path}: damaged checkpoint (its random-number state cannot be restored: "
                                  f"{type(e).__name__})") from None


def _try_rng(state: Any) -> None:
    if not isinstance(state, dict) or not set(state) <= {"torch", "python", "cuda"}:
        raise TypeError("not a dict of torch, python and cuda states")
    if "torch" in state:
        t = state["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise TypeError("torch state")
        torch.Generator().set_state(t.cpu())
    if "python" in state:
        py = state["python"]
        if not isinstance(py, (list, tuple)) or len(py) != 3 or not isinstance(py[1], (list, tuple)):
            raise TypeError("python state")
        random.Random().setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda") or []
    if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() <= 1 << 20 for t in cuda):
        raise TypeError("cuda states")


def check_optimizer(path: str, opt: Any) -> None:
    """An optimiser state is a dict whose tensors are all finite (a NaN in Adam's moments would make the
    first step NaN); whether it fits the optimiser is decided when it is loaded (a misfit starts afresh)."""
    if opt is None:
        return
    if not isinstance(opt, dict):
        raise CheckpointError(f"{path}: damaged checkpoint (its optimizer state is a {type(opt).__name__}, not a dict)")
    bad = nonfinite_tensors(opt)
    if bad:
        raise NonFiniteError(f"{path}: its optimizer state holds NaN or infinite values ({len(bad)} tensor(s), "
                             f"first: {bad[0]}); use an earlier checkpoint")


def check_weights_fit(path: str, ckpt: Dict[str, Any], model_config: ModelConfig) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's weights (and EMA) have exactly the keys and
    shapes of the model ``model_config`` describes. The model is built on the ``meta`` device (no memory,
    no power iterations), after a count that rejects absurd block numbers before building anything."""
    from .model import ResidualFlow

    blocks = sum(model_config.nblocks) + (model_config.fc_nblocks if model_config.fc_end else 0)
    check_fit_on_meta(path, {"model": ckpt["model"], "EMA": ckpt.get("ema")}, blocks, lambda: ResidualFlow(model_config))


def check_fit_on_meta(path: str, weights: Dict[str, Optional[dict]], blocks: int, build: Callable[[], Any]) -> None:
    """Every state_dict in ``weights`` (by what it is: model, EMA) has the keys and shapes of the model ``build()``
    makes, built on the ``meta`` device (nothing allocated), after a count that rejects a number of ``blocks``
    the first state_dict cannot hold. Raises :class:`CheckpointError` naming ``path``."""
    first = next(iter(weights.values()))
    if blocks > len(first):  # every block owns at least one tensor
        raise CheckpointError(f"{path}: its settings ask for {blocks} blocks but it holds only {len(first)} weight tensors; "
                              f"the file is damaged")
    try:
        with torch.device("meta"):
            reference = build().state_dict()
    except (ConfigError, ValueError, TypeError, OverflowError, RuntimeError, MemoryError) as e:
        # RuntimeError: sizes whose storage would overflow 64 bits ("Storage size calculation overflowed")
        raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from None
    for what, sd in weights.items():
        if sd is None:
            continue
        missing = [k for k in reference if k not in sd]
        unexpected = [k for k in sd if k not in reference]
        wrong = [k for k in reference if k in sd and tuple(sd[k].shape) != tuple(reference[k].shape)]
        if missing or unexpected or wrong:
            detail = []
            if missing:
                detail.append(f"{len(missing)} missing, e.g. {missing[0]}")
            if unexpected:
                detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
            if wrong:
                k = wrong[0]
                detail.append(f"{len(wrong)} of the wrong shape, e.g. {k}: {list(sd[k].shape)} in the file, "
                              f"{list(reference[k].shape)} in the model")
            whose = "its weights" if what == "model" else f"its {what} weights"
            raise CheckpointError(f"{path}: {whose} do not fit this architecture ({'; '.join(detail)})")
