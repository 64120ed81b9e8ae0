"""What the optimiser side of a run is made of: the optimiser factory (and the mapping of a paper
checkpoint's optimiser state onto it), the learning-rate schedule and the EMA of the weights."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict

import torch
import torch.nn as nn

from .config import ConfigError, TrainConfig
from .layers.lipschitz import power_buffers

__all__ = ["EMA", "LRSchedule", "make_optimizer", "paper_optimizer_state"]

PAPER_BETAS = (0.9, 0.99)  # the paper's Adam / Adamax betas
SGD_MOMENTUM = 0.9
COSINE_T0_EPOCHS = 20.0  # first period of the cosine warm restarts; each next period is twice as long
MULTISTEP_MILESTONES = (60, 120, 160)  # epochs at which SGD's LR is multiplied by MULTISTEP_GAMMA
MULTISTEP_GAMMA = 0.2


class EMA:
    """Exponential moving average of the parameters, kept as a full model copy (DiT-style).

    Buffers follow the training model (ActNorm flags, running means), except the power-iteration state
    (``u``, ``v``, ``scale``), which belongs to the averaged weights and is re-estimated before use.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._skip = {n for n, _ in power_buffers(self.model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged weights towards ``model``'s and copy its buffers (but the power-iteration state)."""
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        src = dict(model.named_buffers())
        for name, b in self.model.named_buffers():
            if name not in self._skip:
                b.copy_(src[name])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()


class LRSchedule:
    """Linear warm-up over ``--warmup-iters`` batches, then ``--scheduler`` (if set) by epoch:
    cosine warm restarts (T0 = 20 epochs, Tmult 2) for adam, x0.2 at 60/120/160 for SGD, nothing for
    adamax / rmsprop (the paper's choice). (The paper's warm-up overwrote the LR every iteration, so its
    scheduler never applied.)"""

    def __init__(self, cfg: TrainConfig):
        self.base_lr, self.warmup = cfg.lr, max(cfg.warmup_iters, 0)
        self.kind = {"adam": "cosine", "sgd": "multistep"}.get(cfg.optimizer) if cfg.scheduler else None

    def factor(self, itr: int, epoch_float: float) -> float:
        """The multiplier of the base LR at iteration ``itr``, ``epoch_float`` epochs into training."""
        f = min(1.0, (itr + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.kind == "cosine":
            t0, t_cur = COSINE_T0_EPOCHS, epoch_float
            while t_cur >= t0:  # warm restarts with doubling periods
                t_cur -= t0
                t0 *= 2
            f *= 0.5 * (1 + math.cos(math.pi * t_cur / t0))
        elif self.kind == "multistep":
            f *= MULTISTEP_GAMMA ** sum(epoch_float >= m for m in MULTISTEP_MILESTONES)
        return f

    def lr(self, itr: int, epoch_float: float) -> float:
        return self.base_lr * self.factor(itr, epoch_float)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "base_lr": self.base_lr, "warmup": self.warmup}


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """torch.optim optimisers; ``--wd`` is decoupled for adam (AdamW) and L2 for the others."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=PAPER_BETAS, weight_decay=cfg.wd)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr, betas=PAPER_BETAS, weight_decay=cfg.wd)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.wd)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.wd)
    raise ConfigError(f"unknown --optimizer {cfg.optimizer!r}")


def paper_optimizer_state(paper: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimiser state of a paper checkpoint, re-indexed for ``optimizer``.

    The paper's single parameter group holds every model parameter, the frozen ``geom_p`` / ``lamb``
    included (92 entries where ours has 78); ours holds the trainable ones. Entries are matched by position in
    ``model.parameters()`` (the same order in both codes, as the state_dict keys are); the frozen ones are
    dropped. Raises ValueError when the layout does not fit.
    """
    params = list(model.parameters())
    groups = paper.get("param_groups") or []
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(params):
        raise ValueError(f"it covers {len(ids)} parameters, the model has {len(params)}")
    ours = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: Dict[int, Dict[str, Any]] = {}
    for pid, p in zip(ids, params):
        entry = paper["state"].get(pid)
        if entry is None or id(p) not in index:
            continue
        entry = dict(entry)
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"its {k!r} for a parameter of shape {tuple(p.shape)} has shape {tuple(v.shape)}")
        if "step" in entry and not torch.is_tensor(entry["step"]):
            entry["step"] = torch.tensor(float(entry["step"]))  # torch.optim keeps the step as a tensor
        state[index[id(p)]] = entry
    return {"state": state, "param_groups": ours["param_groups"]}
