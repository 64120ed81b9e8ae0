"""Checks of what a checkpoint holds, run before anything is built from it: the stored flags (the same rules
as the command line), the counters, the list of best checkpoints, and that the weights are finite tensors
that fit the stored architecture (compared on the ``meta`` device). A crafted or damaged file gets one line
(:class:`resflows.checkpoint.CheckpointError`)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from .checkpoint import CheckpointError, NonFiniteError, nonfinite_tensors
from .config import ConfigError, ModelConfig, TrainConfig, validate_config

__all__ = ["validated", "check_weights_fit"]

_COUNTERS = ("epoch", "batch_in_epoch", "itr", "step", "world_size")


def validated(path: str, ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Check everything a checkpoint feeds into a run before anything is built from it: the stored flags
    (types and ranges, the same rules as the command line), the counters, that the weights are tensors
    that are finite and fit the stored architecture. A crafted or damaged file gets one line."""
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
