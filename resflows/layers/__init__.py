"""Flow layers of resflows. Every flow layer follows :class:`resflows.layers.base.FlowLayer`:
``forward(x) -> (y, log|det dy/dx|[B])`` and ``inverse(y) -> (x, log|det dx/dy|[B])``."""
from .activations import ACTIVATIONS, CLipSwish, FullSort, Identity, LeakyLSwish, LipschitzCube, LipSwish, MaxMin, Swish, make_activation
from .actnorm import ActNorm1d, ActNorm2d
from .base import FlowLayer, SequentialFlow
from .coupling import ChannelCouplingBlock, CouplingBlock, MaskedCouplingBlock
from .dense import LipschitzDenseLayer
from .elemwise import LogitTransform, Normalize
from .fc import FCNet, FCWrapper
from .glow import InvertibleConv2d, InvertibleLinear
from .iresblock import InverseNotConvergedWarning, iResBlock
from .lipschitz import (
    POWER_ITERATION_BUFFERS,
    InducedNorm,
    InducedNormConv2d,
    InducedNormLinear,
    LipschitzMap,
    LopConv2d,
    LopLinear,
    get_conv2d,
    get_linear,
    lipschitz_layers,
    norm_order_gradients,
    power_buffers,
)
from .normalization import MovingBatchNorm1d, MovingBatchNorm2d
from .power import update_lipschitz
from .squeeze import SqueezeLayer
from .upkeep import FlowUpkeep

__all__ = [
    "FlowLayer", "SequentialFlow", "iResBlock", "InverseNotConvergedWarning",
    "InducedNormLinear", "InducedNormConv2d", "LopLinear", "LopConv2d", "get_linear", "get_conv2d",
    "LipschitzMap", "InducedNorm", "lipschitz_layers", "update_lipschitz", "norm_order_gradients",
    "POWER_ITERATION_BUFFERS", "power_buffers",
    "LipSwish", "Swish", "CLipSwish", "Identity", "FullSort", "MaxMin", "LipschitzCube", "ACTIVATIONS", "make_activation",
    "ActNorm1d", "ActNorm2d", "SqueezeLayer", "LogitTransform", "Normalize",
    "MovingBatchNorm1d", "MovingBatchNorm2d", "InvertibleLinear", "InvertibleConv2d",
    "CouplingBlock", "ChannelCouplingBlock", "MaskedCouplingBlock",
    "LipschitzDenseLayer", "LeakyLSwish", "FCNet", "FCWrapper", "FlowUpkeep",
]
