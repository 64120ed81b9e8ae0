"""The multiscale Residual Flow (Chen et al. 2019, Sec. 4 and Appendix E).

Per scale: ``[init layer] [ActNorm if first resblock] n x ([InvConv] iResBlock [ActNorm] [FC ActNorm])``
then a squeeze, except on the last scale, which ends with ``fc_nblocks`` fully connected residual blocks.
With ``factor_out`` half of the channels leave the flow after each non-final scale. Module names follow the
paper's code, so ``state_dict`` keys match (``transforms.0.chain.2.nnet.0.weight``) and its checkpoints
load with ``strict=True``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .checks import check_images, check_latent
from .config import ModelConfig, check_scales, n_scales
from .layers import (
    ActNorm1d,
    ActNorm2d,
    ChannelCouplingBlock,
    CouplingBlock,
    FCNet,
    FCWrapper,
    InvertibleConv2d,
    InvertibleLinear,
    LogitTransform,
    MaskedCouplingBlock,
    MovingBatchNorm2d,
    Normalize,
    SequentialFlow,
    SqueezeLayer,
    get_conv2d,
    get_linear,
    iResBlock,
    make_activation,
)
from .layers.base import zeros_logdet
from .layers.coupling import coupling_split
from .layers.dense import dense_conv_layers, dense_fc_layers
from .layers.monotone import MonotoneBlock
from .layers.squeeze import squeeze, unsqueeze
from .layers.upkeep import FlowUpkeep
from .layers.vardeq import VariationalDequantizer, conditioned_branch, make_block

Tensor = torch.Tensor
Size = Tuple[int, int, int]

__all__ = ["ResidualFlow", "n_scales"]


class _HeadActNorm(ActNorm2d):
    """ActNorm inside a classification head: a plain module returning only the tensor."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class _StackBuilder:
    """Builds one scale's SequentialFlow (the paper's StackediResBlocks / StackedCouplingBlocks)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    # -- shared pieces ----------------------------------------------------------------------
    def actnorm(self, size: Size, fc: bool) -> nn.Module:
        if fc:
            return FCWrapper(ActNorm1d(math.prod(size)))
        return ActNorm2d(size[0])

    def quadratic(self, size: Size, fc: bool) -> nn.Module:
        if fc:
            return FCWrapper(InvertibleLinear(math.prod(size)))
        return InvertibleConv2d(size[0])

    def orders(self) -> Tuple[list, list]:
        if self.cfg.learn_p:
            # One learnable order per position, shared cyclically: layer i maps p_i -> p_{i+1}, the last
            # maps back to p_0, so the whole branch is contractive in the p_0 norm (paper).
            n = len(self.cfg.kernels)
            domains = [nn.Parameter(torch.tensor(0.0)) for _ in range(n)]
            return domains, domains[1:] + [domains[0]]
        ps = list(self.cfg.vnorms)
        return ps[:-1], ps[1:]

    def iresblock(self, nnet: nn.Module) -> iResBlock:
        c = self.cfg
        block = MonotoneBlock if c.monotone_resolvent else iResBlock  # same arguments, same state_dict keys
        return block(
            nnet,
            n_power_series=c.n_power_series,
            n_dist=c.n_dist,
            n_samples=c.n_samples,
            n_exact_terms=c.n_exact_terms,
            neumann_grad=c.neumann_grad,
            grad_in_forward=c.mem_eff,
        )

    def _lip_kwargs(self) -> dict:
        c = self.cfg
        # Only the Lipschitz target: the power-iteration settings are the model's (lipschitz_defaults).
        return dict(coeff=c.coeff)

    # -- residual blocks --------------------------------------------------------------------
    def resblock(self, size: Size, fc: bool, idim: int, first: bool = False) -> iResBlock:
        c = self.cfg
        if c.densenet:
            return self.iresblock(self.dense_branch(size, fc))
        domains, codomains = self.orders()
        if fc:
            def linear(i, n_in, n_out):
                return get_linear(n_in, n_out, domain=domains[i], codomain=codomains[i], **self._lip_kwargs())

            nnet = FCNet(size, size, idim, len(c.kernels) - 1, c.act, c.preact, c.dropout, linear)
            return self.iresblock(nnet)
        ch, h, w = size

        def conv(i, n_in, n_out, k):
            return get_conv2d(n_in, n_out, k, 1, k // 2, domain=domains[i], codomain=codomains[i],
                              spatial_dims=(h, w), **self._lip_kwargs())

        return self.iresblock(self.conv_branch(ch, ch, idim, ch, first, conv))

    def conv_branch(self, pre_channels: int, n_in: int, idim: int, n_out: int, first: bool, conv) -> nn.Sequential:
        """``[bn] [act] conv(n_in, idim) [bn] act ... [dropout] conv(idim, n_out) [bn]`` over ``--kernels``, with
        ``conv(i, n_in, n_out, k)`` building the i-th convolution (normalised in residual blocks, plain in coupling
        blocks). The pre-activation (not on the first block) normalises ``pre_channels`` (as the paper)."""
        c = self.cfg
        ks = c.kernels
        layers: List[nn.Module] = []
        mult = 1

        def act():
            nonlocal mult
            layers.append(make_activation(c.act))
            mult = getattr(layers[-1], "out_multiplier", 1)

        if not first and c.preact:
            if c.batchnorm:
                layers.append(MovingBatchNorm2d(pre_channels))
            act()
        layers.append(conv(0, n_in * mult, idim, ks[0]))
        if c.batchnorm:
            layers.append(MovingBatchNorm2d(idim))
        act()
        for i, k in enumerate(ks[1:-1]):
            layers.append(conv(i + 1, idim * mult, idim, k))
            if c.batchnorm:
                layers.append(MovingBatchNorm2d(idim))
            act()
        if c.dropout:
            layers.append(nn.Dropout2d(c.dropout))
        layers.append(conv(len(ks) - 1, idim * mult, n_out, ks[-1]))
        if c.batchnorm:
            layers.append(MovingBatchNorm2d(n_out))  # the paper's coupling code used C here, which crashes for checkerboard
        return nn.Sequential(*layers)

    def dense_branch(self, size: Size, fc: bool) -> nn.Module:
        """The i-DenseNets branch (resflows/layers/dense.py): no pre-activation, --kernels unused; convs
        map the first --vnorms order to itself, the fully connected branch uses 2-norms (as the fork)."""
        c = self.cfg
        common = dict(depth=c.densenet_depth, act=c.act, learnable_concat=c.learnable_concat, lip_coeff=c.lip_coeff)
        if fc:
            def linear(n_in, n_out):
                return get_linear(n_in, n_out, domain=2, codomain=2, **self._lip_kwargs())

            return FCNet.wrap(size, size, dense_fc_layers(math.prod(size), growth=c.fc_densenet_growth, make_linear=linear, **common))
        ch, h, w = size
        p = c.vnorms[0]

        def conv(n_in, n_out, k):
            return get_conv2d(n_in, n_out, k, 1, k // 2, domain=p, codomain=p, spatial_dims=(h, w), **self._lip_kwargs())

        return dense_conv_layers(ch, growth=c.densenet_growth, make_conv=conv, batchnorm=c.batchnorm, **common)

    # -- variational dequantiser -------------------------------------------------------------
    def dequantizer(self, size: Size) -> VariationalDequantizer:
        """q(u | x) on images of ``size`` (resflows/layers/vardeq.py): ``--var-deq-nblocks`` blocks of the class
        ``--var-deq-mf`` picks, with the main flow's estimator settings and dense-layer flags."""
        c = self.cfg
        ch, h, w = size
        p = c.vnorms[0]

        def conv(n_in, n_out, k):
            return get_conv2d(n_in, n_out, k, 1, k // 2, domain=p, codomain=p, spatial_dims=(h, w), **self._lip_kwargs())

        block_cls = MonotoneBlock if c.var_deq_mf else iResBlock  # --var-deq-mf: the dequantiser's blocks
        estimator = dict(n_power_series=c.n_power_series, n_dist=c.n_dist, n_samples=c.n_samples,
                         n_exact_terms=c.n_exact_terms, neumann_grad=c.neumann_grad, grad_in_forward=c.mem_eff)
        return VariationalDequantizer([
            make_block(block_cls, conditioned_branch(ch, c.densenet_depth, c.densenet_growth, c.var_deq_act, conv,
                                                     c.learnable_concat, c.lip_coeff, c.var_deq_cond_width,
                                                     c.var_deq_cond_hidden), **estimator)
            for _ in range(c.var_deq_nblocks)
        ])

    # -- coupling blocks ---------------------------------------------------------------------
    def coupling(self, size: Size, fc: bool, idim: int, swap: bool, checkerboard: bool, first: bool = False) -> nn.Module:
        c = self.cfg
        ch, h, w = size
        if fc:
            na, nb = coupling_split(ch, swap)

            def linear(i, n_in, n_out):
                return nn.Linear(n_in, n_out)

            nnet = FCNet((na, h, w), (2 * nb, h, w), idim, len(c.kernels) - 1, c.act, c.preact, c.dropout, linear)
            return CouplingBlock(ch, nnet, swap=swap)
        if checkerboard:
            n_in, n_out = ch, 2 * ch
        else:
            na, nb = coupling_split(ch, swap)
            n_in, n_out = na, 2 * nb

        def conv(i, n_in, n_out, k):
            return nn.Conv2d(n_in, n_out, k, 1, k // 2)

        nnet = self.conv_branch(ch, n_in, idim, n_out, first, conv)
        if checkerboard:
            return MaskedCouplingBlock(ch, nnet, mask_type="checkerboard1" if swap else "checkerboard0")
        return ChannelCouplingBlock(ch, nnet, mask_type="channel1" if swap else "channel0")

    # -- one scale ---------------------------------------------------------------------------
    def stack(self, size: Size, n_blocks: int, squeeze_out: bool, init_layer: Optional[nn.Module],
              first_resblock: bool) -> SequentialFlow:
        c = self.cfg
        coupling = c.block == "coupling"
        swap = True  # toggled before every coupling block, as in the paper (first block: not swapped)
        # Checkerboard masks on the scale that has the init layer, channel masks elsewhere (paper).
        checkerboard = init_layer is not None

        def block(fc: bool, idim: int, first: bool = False) -> nn.Module:
            nonlocal swap
            if coupling:
                swap = not swap
                return self.coupling(size, fc, idim, swap, checkerboard and not fc, first)
            return self.resblock(size, fc, idim, first)

        chain: List[nn.Module] = []
        if init_layer is not None:
            chain.append(init_layer)
        if first_resblock and c.actnorm:
            chain.append(self.actnorm(size, c.fc))
        if first_resblock and c.fc_actnorm:
            chain.append(self.actnorm(size, True))
        for i in range(n_blocks):
            if c.quadratic:
                chain.append(self.quadratic(size, c.fc))
            chain.append(block(c.fc, c.idim, first=first_resblock and i == 0 and squeeze_out))
            if c.actnorm:
                chain.append(self.actnorm(size, c.fc))
            if c.fc_actnorm:
                chain.append(self.actnorm(size, True))
        if squeeze_out:
            chain.append(SqueezeLayer(2))
        elif c.fc_end:
            for _ in range(c.fc_nblocks):
                chain.append(block(True, c.fc_idim))
                if c.actnorm or c.fc_actnorm:
                    chain.append(self.actnorm(size, True))
        return SequentialFlow(chain)


class ResidualFlow(FlowUpkeep):
    """Multiscale Residual Flow.

    ``model(x)`` returns ``(z, logdet)``: ``z`` is ``[B, D]`` in the paper's order (factored-out parts
    first, then the last scale, each flattened) and ``logdet[B] = log|det dz/dx|`` as estimated by the
    blocks' settings (stochastic for residual blocks). ``model.inverse(z)`` returns ``x``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, h, w = config.input_size
        if config.squeeze_first:
            c, h, w = c * 4, h // 2, w // 2
        self.model_input_size: Size = (c, h, w)
        self.channels_last = True
        # Public entry points check that x (or z) is finite and x in [0, 1]: a min/max, i.e. a device
        # synchronisation on GPUs. The trainer turns this off (its data pipeline yields valid images).
        self.check_values = True
        check_scales(config)  # (ModelConfig checks it too; a config changed after construction is checked here)
        self.n_scale = len(config.nblocks)
        builder = _StackBuilder(config)
        transforms = []
        self.dims: List[Size] = []
        size = (c, h, w)
        for i in range(self.n_scale):
            last = i == self.n_scale - 1
            init_layer = self._init_layer() if i == 0 else None
            if i == 0:
                # The paper's model also keeps its input layer as ``init_layer``: for Normalize that is two
                # more state_dict keys (init_layer.mean / .std), so its checkpoints load strictly.
                self.init_layer = init_layer
            transforms.append(builder.stack(size, config.nblocks[i], squeeze_out=not last, init_layer=init_layer,
                                            first_resblock=config.first_resblock and i == 0))
            if not last:
                size = (size[0] * 4, size[1] // 2, size[2] // 2)
                if config.factor_out:
                    self.dims.append((size[0] // 2, size[1], size[2]))
                    size = (size[0] - size[0] // 2, size[1], size[2])
        self.dims.append(size)
        self.transforms = nn.ModuleList(transforms)
        # q(u | x) of --var-deq; None (no state_dict keys) otherwise, as in the Monotone Flows code.
        self.dequantizer = builder.dequantizer(config.input_size) if config.var_deq else None
        if config.classification:
            self._build_classifier()

    # -- construction helpers ---------------------------------------------------------------
    def _init_layer(self) -> Optional[nn.Module]:
        cfg = self.config
        if cfg.init_layer == "logit":
            return LogitTransform(cfg.logit_alpha)
        if cfg.init_layer == "normalize":
            return Normalize(cfg.normalize_mean, cfg.normalize_std)
        return None

    def _build_classifier(self) -> None:
        cfg = self.config
        hidden = []
        c = self.model_input_size[0]
        for i in range(self.n_scale):
            if i < self.n_scale - 1:
                c = c * 2 if cfg.factor_out else c * 4
            hidden.append(c)
        self.classification_heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(ch, cfg.cdim, 3, 1, 1),
                _HeadActNorm(cfg.cdim),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d((1, 1)),
            )
            for ch in hidden
        )
        self.logit_layer = nn.Linear(cfg.cdim * len(hidden), cfg.n_classes)

    # -- forward ----------------------------------------------------------------------------
    def _run(self, x: Tensor, with_logdet: bool, classify: bool):
        check_images(self, x)
        x = self._layout(x)
        if self.config.squeeze_first:
            x = squeeze(x, 2)
        logdet = zeros_logdet(x) if with_logdet else None
        out, heads = [], []
        last = self.n_scale - 1
        for idx, stack in enumerate(self.transforms):
            if with_logdet:
                x, ld = stack(x)
                logdet = logdet + ld
            else:
                x = stack.transform(x)
            if self.config.factor_out and idx < last:
                d = x.shape[1] // 2
                x, h = x[:, :d], x[:, d:]
                out.append(h)
            elif not self.config.factor_out or idx == 0:
                h = x
            # else (factor_out, last scale): h is still the half factored out at the previous scale. The paper's
            # last head sees that (same shape as the last scale's output), so its checkpoints give its logits.
            if classify:
                heads.append(self.classification_heads[idx](h))
        out.append(x)
        z = torch.cat([o.reshape(o.shape[0], -1) for o in out], 1)
        logits = None
        if classify:
            logits = self.logit_layer(torch.cat(heads, 1).flatten(1))
        return z, logdet, logits

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)``."""
        z, logdet, _ = self._run(x, True, False)
        return z, logdet

    def dequantize(self, x: Tensor, nvals: int) -> Tuple[Tensor, Tensor]:
        """``(y, log q(u | x))`` with ``u ~ q(u | x)`` (``--var-deq``): ``y = ((nvals - 1) x + u) / nvals`` is what the
        flow sees, i.e. ``(k + u) / nvals`` for the noise-free image ``x = k / (nvals - 1)``; ``log q`` is [B]."""
        if self.dequantizer is None:
            raise RuntimeError("this model has no variational dequantiser (built without --var-deq)")
        check_images(self, x)
        u, logq = self.dequantizer(x)
        return ((nvals - 1) * x + u) / nvals, logq

    def forward_with_logits(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(z, logdet, logits)`` for the hybrid task (classification heads on every scale)."""
        self._need_classifier()
        return self._run(x, True, True)

    def classify(self, x: Tensor) -> Tensor:
        """Class logits only (classification task; no log-det is estimated)."""
        self._need_classifier()
        return self._run(x, False, True)[2]

    def transform(self, x: Tensor) -> Tensor:
        """``z`` only, without estimating log-dets."""
        return self._run(x, False, False)[0]

    def _need_classifier(self) -> None:
        if not self.config.classification:
            raise RuntimeError("this model has no classification heads (built for the density task)")

    # -- inverse ----------------------------------------------------------------------------
    def _split_z(self, z: Tensor) -> List[Tensor]:
        z = z.reshape(z.shape[0], -1)
        sizes = [math.prod(d) for d in self.dims]
        if z.shape[1] != sum(sizes):
            raise ValueError(f"z has {z.shape[1]} dimensions; this model's latent has {sum(sizes)}")
        parts = torch.split(z, sizes, 1)
        return [p.reshape(z.shape[0], *d) for p, d in zip(parts, self.dims)]

    def _layout(self, x: Tensor) -> Tensor:
        # Channels-last (NHWC) storage makes oneDNN / cuDNN convolutions several times faster; the
        # logical layout, outputs and the order of z are unchanged.
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def inverse(self, z: Tensor) -> Tensor:
        """``x = f^{-1}(z)`` by fixed-point iteration in every residual block."""
        check_latent(self, z)
        zs = [self._layout(p) for p in self._split_z(z)]
        x = self.transforms[-1].invert(zs[-1])
        for idx in range(self.n_scale - 2, -1, -1):
            if self.config.factor_out:
                x = torch.cat([x, zs[idx]], 1)
            x = self.transforms[idx].invert(x)
        if self.config.squeeze_first:
            x = unsqueeze(x, 2)
        return x

    # -- maintenance (update_lipschitz, lipschitz_constants, ... come from FlowUpkeep) --------------
    def lipschitz_defaults(self) -> Dict[str, Optional[float]]:
        """``--n-lipschitz-iters`` if set, else iterate to ``--sn-tol``."""
        n = self.config.n_lipschitz_iters
        if n is not None:
            return dict(n_iterations=n, atol=None, rtol=None)
        return dict(n_iterations=None, atol=self.config.sn_tol, rtol=self.config.sn_tol)

    @property
    def latent_dim(self) -> int:
        return sum(math.prod(d) for d in self.dims)
