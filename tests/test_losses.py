"""The training losses (compute_loss and bits_per_dim in resflows/losses.py) against the formulas written
out here with Python floats, for fixed model outputs: density, classification and hybrid, with and without
--scale-dim, with a log-det weight beta < 1 (annealing) and with the --padding term."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from resflows import TrainConfig
from resflows.losses import compute_loss
from resflows.trainer import Trainer

C, H, W = 3, 2, 2


class FixedOutputs(nn.Module):
    """Stands in for ModelForward: returns fixed z, logdet and logits for the mode asked."""

    def __init__(self, z, logdet, logits):
        super().__init__()
        self.z, self.logdet, self.logits = z, logdet, logits

    def forward(self, x, mode="density"):
        if mode == "classify":
            return self.logits
        if mode == "hybrid":
            return self.z, self.logdet, self.logits
        return self.z, self.logdet


def expected_bits_per_dim(z, logdet, x, padding, dist, nvals, beta):
    """-log p(x) / (C H W ln 2), log p(x) = log N(z) + beta logdet - H W (C + padding) log(nvals) - log p(u)."""
    logpz = sum(-0.5 * (math.log(2 * math.pi) + v * v) for v in z)
    logpu = 0.0
    if padding and dist == "gaussian":  # u = nvals * x[C:] ~ N(nvals / 2, (nvals / 8)^2)
        mean, std = nvals / 2, nvals / 8
        logpu = sum(-0.5 * math.log(2 * math.pi) - math.log(std) - 0.5 * ((nvals * u - mean) / std) ** 2
                    for u in x[C:].reshape(-1).tolist())
    logpx = logpz + beta * logdet - H * W * (C + padding) * math.log(nvals) - logpu
    return -logpx / (C * H * W * math.log(2))


def cross_entropy(logits, label):
    return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))


def outputs(padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = 4
    x = torch.rand(b, C + padding, H, W, generator=g, dtype=torch.float64)
    z = torch.randn(b, (C + padding) * H * W, generator=g, dtype=torch.float64)
    logdet = 5 * torch.randn(b, generator=g, dtype=torch.float64)
    logits = torch.randn(b, 10, generator=g, dtype=torch.float64)
    y = torch.tensor([3, 0, 9, 3])
    return x, y, FixedOutputs(z, logdet, logits)


CASES = [
    ("density", False, 0, "uniform", 256, 1.0),
    ("density", False, 0, "uniform", 32, 0.3),
    ("density", False, 1, "uniform", 256, 1.0),
    ("density", False, 2, "gaussian", 256, 0.6),
    ("classification", False, 0, "uniform", 256, 1.0),
    ("hybrid", False, 0, "uniform", 256, 1.0),
    ("hybrid", True, 0, "uniform", 256, 1.0),
    ("hybrid", False, 2, "gaussian", 32, 0.25),
    ("hybrid", True, 1, "gaussian", 256, 0.5),
]


@pytest.mark.parametrize("task,scale_dim,padding,dist,nvals,beta", CASES)
def test_loss_matches_the_written_out_formula(task, scale_dim, padding, dist, nvals, beta):
    x, y, forward = outputs(padding)
    cfg = TrainConfig(task=task, scale_dim=scale_dim, padding=padding, padding_dist=dist)
    out = compute_loss(forward, x, y, cfg, (C, H, W), nvals, beta)
    b = x.shape[0]
    bpd = [expected_bits_per_dim(forward.z[i].tolist(), float(forward.logdet[i]), x[i], padding, dist, nvals, beta)
           for i in range(b)]
    xent = sum(cross_entropy(forward.logits[i].tolist(), int(y[i])) for i in range(b)) / b  # nats
    if task == "density":
        expected = sum(bpd) / b
    elif task == "classification":
        expected = xent
    else:  # bits/dim times the number of dimensions unless --scale-dim, plus the cross-entropy in bits
        expected = sum(bpd) / b * (1 if scale_dim else C * H * W) + xent / math.log(2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    if task != "classification":
        assert out.bpd.tolist() == pytest.approx(bpd, rel=1e-12)


@pytest.mark.parametrize("itr,annealing,beta", [(0, 10, 0.0), (4, 10, 0.4), (10, 10, 1.0), (25, 10, 1.0), (7, 0, 1.0)])
def test_beta_annealing(itr, annealing, beta):
    """--annealing-iters A: the log-det weight is min(1, itr / A), 1 without annealing."""
    trainer = SimpleNamespace(cfg=TrainConfig(annealing_iters=annealing), itr=itr)
    assert Trainer.beta(trainer) == pytest.approx(beta, abs=1e-15)
