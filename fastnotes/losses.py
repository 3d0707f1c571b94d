"""The losses' old home, kept so that `from fastnotes.losses import ...` keeps working: ZLPR lives in
fastnotes/zlpr.py and the n x m classification loss in fastnotes/nm_class.py."""
from .nm_class import nm_class_ce
from .zlpr import (FUSED_CHUNK_BYTES, FusedLinearMultilabelCE, MultilabelCE, fused_linear_multilabel_ce,
                   multilabel_ce, sparse_multilabel_ce)

__all__ = ["FUSED_CHUNK_BYTES", "FusedLinearMultilabelCE", "MultilabelCE", "fused_linear_multilabel_ce",
           "multilabel_ce", "nm_class_ce", "sparse_multilabel_ce"]
