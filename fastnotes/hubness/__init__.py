"""Hubness (docs/hubness.md): exact k-NN and k-occurrence counting without the distance matrix,
hubness statistics, hubness reduction (secondary distances) and hub-prior latent sampling."""
from .knn import METRICS, k_occurrence, knn

__all__ = ["METRICS", "k_occurrence", "knn"]
from .stats import hubness_stats

__all__ += ["hubness_stats"]
from .reduction import reduce_hubness
from .sampling import hub_sample

__all__ += ["hub_sample", "reduce_hubness"]
