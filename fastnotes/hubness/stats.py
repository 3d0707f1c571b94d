"""Hubness statistics of a k-occurrence vector (docs/hubness.md; the definitions of
scikit-hubness, except skewness_truncnorm: see hubness_stats). Cheap post-passes in float64; values
are Python floats."""
import math

import torch

from .. import _checks


def _truncnorm_skewness(mean, sd):
    """Skewness of a normal(mean, sd) truncated to [0, inf): with a = -mean/sd and the inverse Mills
    ratio lam = phi(a) / (1 - Phi(a)), skew = lam (2 lam^2 - 3 a lam + a^2 - 1) / (1 + a lam - lam^2)^1.5."""
    if not sd > 0:
        return 0.0
    a = -mean / sd
    lam = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(a / math.sqrt(2)))
    var = 1 + a * lam - lam * lam
    return lam * (2 * lam * lam - 3 * a * lam + a * a - 1) / var ** 1.5


def hubness_stats(counts, k, *, hub_size=2.0, n_query=None):
    """Statistics of N_k over the counted (reference) objects.

    Args:
        counts: [m] integer k-occurrences (fastnotes.hubness.k_occurrence).
        k: the k the counts were taken with.
        hub_size: hubs are the points with N_k >= hub_size * k.
        n_query: number of query points (default: counts.sum() / k, exact for k_occurrence output).
    Returns a dict:
        skewness: m3 / m2^1.5 with population moments (scipy.stats.skew, bias=True); 0 when N_k is
            constant (scipy gives NaN there).
        skewness_truncnorm: the skewness (third standardised moment) of a normal with the sample mean
            and sd (ddof 1) truncated to [0, inf) (0 when N_k is constant). scikit-hubness's value of
            the same name differs: it returns stats.truncnorm(a, b).moment(3), the raw (uncentred,
            unstandardised) third moment of the standard truncated normal.
        robinhood: sum |N_k - mean| / (2 sum N_k), the share of occurrences to redistribute.
        gini: sum_ij |N_i - N_j| / (2 m sum N_k).
        antihub_occurrence: share of points with N_k = 0.
        hub_occurrence: sum of N_k over hubs / (k n_query), the share of kNN slots held by hubs.
        atkinson: 1 - mean(sqrt N_k)^2 / mean(N_k) (epsilon 0.5).
        groupie_ratio: max N_k / (k n_query).
        mean, max: of N_k. Ratios over sum N_k are 0 when it is 0.
    """
    _checks.check_tensor("hubness_stats", "counts", counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"hubness_stats: counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"hubness_stats: counts must be an integer tensor, got {counts.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"hubness_stats: k must be a positive int, got {k!r}")
    if not hub_size > 0:
        raise ValueError(f"hubness_stats: hub_size must be positive, got {hub_size!r}")
    n = counts.double().cpu()
    if bool((n < 0).any()):
        raise ValueError("hubness_stats: counts must be non-negative")
    m = n.numel()
    total = n.sum().item()
    if n_query is None:
        n_query = total / k
    slots = k * n_query
    mean = n.mean().item()
    dev = n - mean
    m2 = (dev ** 2).mean().item()
    m3 = (dev ** 3).mean().item()
    sd1 = math.sqrt((dev ** 2).sum().item() / (m - 1)) if m > 1 else 0.0
    ranks = torch.arange(1, m + 1, dtype=torch.float64)
    gini_num = ((2 * ranks - m - 1) * torch.sort(n).values).sum().item()
    hubs = n >= hub_size * k

    def share(value, denominator):
        return value / denominator if denominator > 0 else 0.0

    return {
        "skewness": m3 / m2 ** 1.5 if m2 > 0 else 0.0,
        "skewness_truncnorm": _truncnorm_skewness(mean, sd1),
        "robinhood": share(dev.abs().sum().item(), 2 * total),
        "gini": share(gini_num, m * total),
        "antihub_occurrence": (n == 0).double().mean().item(),
        "hub_occurrence": share(n[hubs].sum().item(), slots),
        "atkinson": 1 - share(n.sqrt().mean().item() ** 2, mean),
        "groupie_ratio": share(n.max().item(), slots),
        "mean": mean,
        "max": n.max().item(),
    }
