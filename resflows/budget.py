"""Memory estimates from the flags alone, checked before anything is built or allocated.

A size flag that is too large (``--nblocks 100000-100000``, ``--fc-idim 10000000``, ``--sample 1000000000``,
``train_toy.py --nblocks 10000000``) would otherwise start building blocks one by one (each runs its power
iterations at construction) and hang or run out of memory much later. The estimates here are lower bounds:
the parameters and buffers counted exactly (one block of each kind built on the ``meta`` device, so nothing
is allocated, then multiplied by the block counts), plus the activations that at least have to be held
(each block's input and hidden features, per example). A run is refused when even that exceeds the memory
of the device it would use: the GPU's memory, or on the CPU the smallest of physical memory, the cgroup limit
and ``ulimit -v`` / ``-d``; ``RESFLOWS_MEMORY_LIMIT_GB`` states a lower limit.

A model of more than :data:`MAX_BLOCKS` blocks is refused too, whatever its memory: every block runs its power
iterations when it is built, so it would take hours to build. The checkpoint readers call
:func:`check_image_model` and :func:`check_toy_model` on the stored settings.
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
from typing import Any, Dict, List, Optional, Tuple

import torch

from .flags import ConfigError

__all__ = [
    "MemoryBudgetError",
    "MAX_BLOCKS",
    "check_block_count",
    "memory_limit",
    "format_bytes",
    "image_model_numel",
    "image_block_features",
    "image_run_estimate",
    "check_image_run",
    "check_image_model",
    "toy_model_numel",
    "toy_run_estimate",
    "check_toy_run",
    "check_toy_model",
]

# Blocks in one model at most: every block runs its power iterations when it is built (0.2-0.45 s a block on a
# CPU for image models), so more would take hours to build before the first step (the paper's largest: 96).
MAX_BLOCKS = 10_000
FLOAT = 4  # bytes: weights, activations and optimiser state are float32
# Copies of every parameter a training step holds: weights, EMA, gradients, Adam's two moments.
TRAIN_COPIES = 5
UNBUILDABLE = 2**63  # a size whose storage torch cannot even describe


class MemoryBudgetError(ConfigError):
    """The flags ask for more memory than the device has (a :class:`ConfigError`: one line, no traceback)."""


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def _cpu_limit() -> Tuple[int, str]:
    limits: List[Tuple[int, str]] = []
    try:
        limits.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of memory this machine has"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit() and int(text) < 2**60:
                limits.append((int(text), "this process's cgroup allows"))
            break
        except OSError:
            continue
    for which, name in ((resource.RLIMIT_AS, "ulimit -v"), (resource.RLIMIT_DATA, "ulimit -d")):
        soft = resource.getrlimit(which)[0]
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append((soft, f"{name} allows"))
    return min(limits) if limits else (UNBUILDABLE, "")


def memory_limit(device: Any = "cpu") -> Tuple[int, str]:
    """``(bytes, what they are)``: the memory a run on ``device`` may use (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        limit = (torch.cuda.get_device_properties(index).total_memory, f"of memory GPU {index} has")
    else:
        limit = _cpu_limit()
    stated = os.environ.get("RESFLOWS_MEMORY_LIMIT_GB")
    if stated:
        try:
            gb = float(stated)
        except ValueError:
            raise ConfigError(f"RESFLOWS_MEMORY_LIMIT_GB must be a number of gigabytes, got {stated!r}") from None
        if math.isfinite(gb) and gb > 0 and gb * 1e9 < limit[0]:
            limit = (int(gb * 1e9), "RESFLOWS_MEMORY_LIMIT_GB allows")
    return limit


def _resolve(device: Any) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _refuse_if_too_large(parts: Dict[str, float], device: Any, hints: Dict[str, str], what: str) -> None:
    # The weights stay for the whole run; training, validation and sampling follow one another.
    total = parts.get("parameters", 0.0) + max([v for k, v in parts.items() if k != "parameters"] or [0.0])
    limit, where = memory_limit(_resolve(device))
    if total <= limit:
        return
    biggest = max(parts, key=parts.get)
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
    raise MemoryBudgetError(f"{what} need at least {format_bytes(total)} of memory ({detail}), more than the "
                            f"{format_bytes(limit)} {where}; use {hints[biggest]}")


def check_block_count(blocks: int, flag: str, value: Any) -> None:
    """Raise :class:`MemoryBudgetError` for more than :data:`MAX_BLOCKS` blocks (a build that would take hours)."""
    if blocks > MAX_BLOCKS:
        raise MemoryBudgetError(f"{flag} {value} asks for {blocks} blocks; more than {MAX_BLOCKS} would take hours to "
                                f"build (each block runs its power iterations when it is built); use fewer {flag}")


def _image_blocks(mc) -> int:
    return sum(mc.nblocks) + (mc.fc_nblocks if mc.fc_end else 0)


def _meta_numel(build) -> Tuple[int, int]:
    """``(parameters, buffers)`` of ``build()``'s module, built on the meta device (no memory, no work)."""
    try:
        with torch.device("meta"):
            module = build()
        params = sum(p.numel() for p in module.parameters())
        return params, sum(t.numel() for t in module.state_dict().values()) - params
    except (RuntimeError, OverflowError, ValueError) as e:  # "Storage size calculation overflowed" and kin
        if isinstance(e, ConfigError):
            raise
        return UNBUILDABLE, 0


def _extrapolate(base: Tuple[int, int], more: Tuple[int, int], times: int) -> Tuple[int, int]:
    return base[0] + times * (more[0] - base[0]), base[1] + times * (more[1] - base[1])


def _bytes(numel: Tuple[int, int], training: bool) -> float:
    # Training holds every parameter TRAIN_COPIES times and every buffer twice (model and EMA).
    params, buffers = (min(n, UNBUILDABLE) for n in numel)
    return float(params) * FLOAT * (TRAIN_COPIES if training else 2) + float(buffers) * FLOAT * 2


# ------------------------------------------------------------------------------------------------
# Image models (train_img.py)
# ------------------------------------------------------------------------------------------------
def _image_numel(mc) -> Tuple[int, int]:
    from .model import ResidualFlow

    s = len(mc.nblocks)
    fc = mc.fc_nblocks if mc.fc_end else 0
    ones = tuple([1] * s)

    def numel(nblocks, fc_nblocks) -> Tuple[int, int]:
        return _meta_numel(lambda: ResidualFlow(dataclasses.replace(mc, nblocks=nblocks, fc_nblocks=fc_nblocks)))

    base = numel(ones, 0)
    total = base
    for i, n in enumerate(mc.nblocks):
        if n > 1:
            added = _extrapolate(base, numel(tuple(2 if j == i else 1 for j in range(s)), 0), n - 1)
            total = (total[0] + added[0] - base[0], total[1] + added[1] - base[1])
    if fc:
        added = _extrapolate(base, numel(ones, 1), fc)
        total = (total[0] + added[0] - base[0], total[1] + added[1] - base[1])
    return total


def image_model_numel(mc) -> int:
    """Exact number of parameters and buffers of ``ResidualFlow(mc)``, from S + 2 small models built on the
    meta device (one block per scale, then one more block on each scale, then one fully connected block)."""
    return min(sum(_image_numel(mc)), UNBUILDABLE)


def image_block_features(mc) -> List[Tuple[int, int]]:
    """``[(blocks, features per example)]``, one entry per kind of block: the floats each block at least holds
    per example while training (its input and the outputs of its hidden layers)."""
    c, h, w = mc.input_size
    if mc.squeeze_first:
        c, h, w = c * 4, h // 2, w // 2
    hidden_layers = max(len(mc.kernels) - 1, 1)
    out = []
    for i, n in enumerate(mc.nblocks):
        hw = h * w
        if mc.densenet:
            hidden = sum(c + k * mc.densenet_growth for k in range(1, mc.densenet_depth + 1)) * hw
        else:
            hidden = hidden_layers * mc.idim * hw
        out.append((n, c * hw + hidden))
        if i < len(mc.nblocks) - 1:
            c, h, w = c * 4, h // 2, w // 2
            if mc.factor_out:
                c -= c // 2
    if mc.fc_end and mc.fc_nblocks:
        d = c * h * w
        if mc.densenet:
            hidden = sum(64 + k * mc.fc_densenet_growth for k in range(1, mc.densenet_depth + 1))
        else:
            hidden = hidden_layers * mc.fc_idim
        out.append((mc.fc_nblocks, d + hidden))
    return out


_IMAGE_HINTS = {
    "parameters": "fewer --nblocks or a smaller --idim, --fc-idim, --cdim, --densenet_growth, --padding or --imagesize",
    "training activations": "a smaller --batchsize (or fewer --nblocks, a smaller --idim or --imagesize)",
    "validation": "a smaller --val-batchsize",
    "sampling": "a smaller --sample",
}


def image_run_estimate(cfg, mc=None, world_size: Optional[int] = None) -> Dict[str, float]:
    """Lower bounds in bytes of what a ``train_img.py`` run with the flags ``cfg`` (a TrainConfig) holds at once:
    ``parameters`` (with EMA, gradients and Adam's moments when training), ``training activations`` (every
    block's, for one rank's batch), ``validation`` and ``sampling`` (one block's, for the whole batch)."""
    from .factory import model_config_from

    mc = model_config_from(cfg) if mc is None else mc
    world = world_size or max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    numel = _image_numel(mc)
    features = image_block_features(mc)
    per_example = sum(n * f for n, f in features)
    widest = max(f for _, f in features)
    training = not (cfg.evaluate or cfg.sample)
    parts = {"parameters": _bytes(numel, training)}
    if training:
        parts["training activations"] = float(math.ceil(cfg.batchsize / world)) * per_example * FLOAT
    if training or cfg.evaluate:
        parts["validation"] = float(math.ceil(cfg.val_batchsize / world)) * widest * FLOAT
    if cfg.sample:
        parts["sampling"] = float(cfg.sample) * widest * FLOAT
    return parts


def check_image_run(cfg, mc=None, device: Any = None) -> None:
    """Raise :class:`MemoryBudgetError` (one line naming the estimate and the flags to lower) when the run
    ``cfg`` cannot fit the memory of its ``--device``."""
    from .factory import model_config_from

    mc = model_config_from(cfg) if mc is None else mc
    parts = image_run_estimate(cfg, mc)
    _refuse_if_too_large(parts, cfg.device if device is None else device, _IMAGE_HINTS, "these flags")
    check_block_count(_image_blocks(mc), "--nblocks", "-".join(map(str, mc.nblocks)))


def check_image_model(mc, device: Any = "cpu", what: str = "its settings") -> None:
    """Only the parameters and buffers of ``ResidualFlow(mc)`` (for a checkpoint's stored architecture)."""
    check_block_count(_image_blocks(mc), "--nblocks", "-".join(map(str, mc.nblocks)) if len(mc.nblocks) < 20 else "")
    _refuse_if_too_large({"parameters": _bytes(_image_numel(mc), False) / 2}, device, _IMAGE_HINTS, what)


# ------------------------------------------------------------------------------------------------
# Toy models (train_toy.py, resflows.toy.load_toy_model)
# ------------------------------------------------------------------------------------------------
def _toy_numel(cfg) -> Tuple[int, int]:
    from .toy.model import build_toy_model

    one = _meta_numel(lambda: build_toy_model(dataclasses.replace(cfg, nblocks=1)))
    two = _meta_numel(lambda: build_toy_model(dataclasses.replace(cfg, nblocks=2)))
    return _extrapolate(one, two, cfg.nblocks - 1)


def toy_model_numel(cfg) -> int:
    """Exact number of parameters and buffers of ``build_toy_model(cfg)`` (a ToyConfig), from models of 1 and
    2 blocks built on the meta device."""
    return min(sum(_toy_numel(cfg)), UNBUILDABLE)


_TOY_HINTS = {
    "parameters": "fewer --nblocks or smaller --dims",
    "training activations": "a smaller --batch_size (or fewer --nblocks, smaller --dims)",
    "test set": "a smaller --test_batch_size",
    "figure": "a smaller --viz_npts or --viz_samples",
}


def toy_run_estimate(cfg) -> Dict[str, float]:
    """Lower bounds in bytes of what a ``train_toy.py`` run holds at once (see :func:`image_run_estimate`)."""
    per_block = 2 + sum(cfg.dims) * (2 if cfg.arch == "realnvp" else 1)
    npts = cfg.viz_npts
    n_samples = cfg.viz_samples if cfg.viz_samples is not None else npts * npts
    return {
        "parameters": _bytes(_toy_numel(cfg), True),
        "training activations": float(cfg.batch_size) * cfg.nblocks * per_block * FLOAT,
        "test set": float(cfg.test_batch_size) * 2 * FLOAT,
        "figure": (float(npts) * npts + n_samples) * 2 * FLOAT,
    }


def check_toy_run(cfg, device: Any = None) -> None:
    """Raise :class:`MemoryBudgetError` when the ``train_toy.py`` run ``cfg`` cannot fit in memory."""
    _refuse_if_too_large(toy_run_estimate(cfg), device, _TOY_HINTS, "these flags")
    check_block_count(cfg.nblocks * (2 if cfg.arch == "realnvp" else 1), "--nblocks", cfg.nblocks)


def check_toy_model(cfg, device: Any = "cpu", what: str = "its settings") -> None:
    """Only the parameters and buffers of ``build_toy_model(cfg)`` (for a checkpoint's stored settings)."""
    check_block_count(cfg.nblocks * (2 if cfg.arch == "realnvp" else 1), "--nblocks", cfg.nblocks)
    _refuse_if_too_large({"parameters": _bytes(_toy_numel(cfg), False) / 2}, device, _TOY_HINTS, what)
