"""fastnotes: fused PyTorch ops for techniques from Su Jianlin's research notes (kexue.fm).

Each op runs a fused kernel: Triton on GPU, Numba on CPU, with a plain-torch reference as the
oracle and fallback. See README.md for the op table.
"""
from . import buffers, diffusion, hubness, lst, nn, optim
from ._dispatch import BACKENDS, BackendUnsupportedError, use_backend
from .attention import relpos_attention, t5_bucket
from .diffusion import NoiseSchedule, sampler_step
from .exact import ExactLoss, GradientNormalizer, exact_loss, expected_accuracy, smooth_accuracy_loss
from .global_pointer import global_pointer_decode, global_pointer_loss
from .lst import ladder_merge
from .nm_class import nm_class_ce
from .nn import LadderSideNetwork, RelPosSelfAttention, T5RelativeBias
from .optim import Amos
from .zlpr import (
                   FusedLinearMultilabelCE,
                   MultilabelCE,
                   fused_linear_multilabel_ce,
                   multilabel_ce,
                   sparse_multilabel_ce,
)

__version__ = "0.1.0"
__all__ = ["BACKENDS", "Amos", "BackendUnsupportedError", "buffers", "ExactLoss", "FusedLinearMultilabelCE", "GradientNormalizer",
           "LadderSideNetwork", "MultilabelCE", "NoiseSchedule", "RelPosSelfAttention", "T5RelativeBias", "diffusion",
           "exact_loss", "expected_accuracy", "fused_linear_multilabel_ce", "global_pointer_decode",
           "global_pointer_loss", "hubness", "ladder_merge", "lst",
           "multilabel_ce", "nm_class_ce", "nn", "optim", "relpos_attention", "sampler_step", "smooth_accuracy_loss",
           "sparse_multilabel_ce", "t5_bucket", "use_backend"]
