"""2-D toy densities for Residual Flows (``train_toy.py``): samplers, the models, the training loop and the
three-panel figure."""
from .config import TOY_ACTIVATIONS, ToyConfig
from .data import DATASETS, data_rng, sample, sample_tensor
from .model import ToyFlow, build_toy_model
from .train import ToyTrainer, load_toy_checkpoint, load_toy_model
from .viz import FIGURE_PIXELS, grid_log_density, log_density, sample_model, save_figure

__all__ = [
    "ToyConfig", "TOY_ACTIVATIONS", "DATASETS", "data_rng", "sample", "sample_tensor",
    "ToyFlow", "build_toy_model", "ToyTrainer", "load_toy_checkpoint", "load_toy_model",
    "FIGURE_PIXELS", "grid_log_density", "log_density", "sample_model", "save_figure",
]
