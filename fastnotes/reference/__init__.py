"""Plain-torch implementations of every op: the float64 test oracle and the fallback backend.
Nothing here imports the kernels."""
from . import amos, lst  # noqa: F401  (amos.amos_update, lst.ladder_merge: oracles of issue 8)
from . import attention  # noqa: F401  (attention.relpos_attention / t5_bucket: the oracle of issue 4)
from . import hubness  # noqa: F401  (fastnotes.reference.hubness.knn / k_occurrence, the k-NN oracle)
from .nm_class import nm_class_ce
from .zlpr import (fused_linear_multilabel_ce, multilabel_ce, multilabel_ce_composite, positives_as_targets,
                   sparse_multilabel_ce)

__all__ = ["fused_linear_multilabel_ce", "multilabel_ce", "multilabel_ce_composite", "nm_class_ce",
           "positives_as_targets", "sparse_multilabel_ce"]
