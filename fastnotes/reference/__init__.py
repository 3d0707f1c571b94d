"""Plain-torch implementations of every op: the float64 test oracle and the fallback backend.
Nothing here imports the kernels."""
from .zlpr import multilabel_ce, multilabel_ce_composite

__all__ = ["multilabel_ce", "multilabel_ce_composite"]
