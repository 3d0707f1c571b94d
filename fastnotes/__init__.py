"""fastnotes: fused PyTorch ops for techniques from Su Jianlin's research notes (kexue.fm).

Each op runs a fused kernel: Triton on GPU, Numba on CPU, with a plain-torch reference as the
oracle and fallback. See README.md for the op table.
"""
from . import diffusion
from ._dispatch import BACKENDS, BackendUnsupportedError, use_backend
from .diffusion import NoiseSchedule, sampler_step
from .exact import ExactLoss, GradientNormalizer, exact_loss, expected_accuracy, smooth_accuracy_loss
from .losses import MultilabelCE, multilabel_ce

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnsupportedError", "ExactLoss", "GradientNormalizer", "MultilabelCE", "NoiseSchedule",
           "diffusion", "exact_loss", "expected_accuracy", "multilabel_ce", "sampler_step", "smooth_accuracy_loss",
           "use_backend"]
