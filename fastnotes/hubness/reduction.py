"""Hubness reduction (specs/hubness.md, section 5): secondary distances computed from the k-NN lists
and re-ranking. All keep "smaller = closer". Plain torch post-passes, O(n k)."""
import math

import torch

from .. import _checks

METHODS = ("mutual_proximity", "local_scaling", "nicdm", "csls")
DEFAULT_NEIGHBORS = {"local_scaling": 5, "nicdm": 5, "csls": 10}


def _normal_sf(d, mu, sd):
    """P(N(mu, sd) > d); a zero sd gives the step 1 / 0.5 / 0."""
    z = torch.where(sd > 0, (d - mu) / (sd * math.sqrt(2)), torch.sign(d - mu) * math.inf)
    z = torch.nan_to_num(z, nan=0.0)
    return 0.5 * torch.special.erfc(z)


def _row_statistics(method, dist, neighbors):
    """Per-point statistics from a [*, k] list of its nearest distances (nearest first)."""
    if method == "mutual_proximity":
        return dist.mean(dim=1), dist.std(dim=1, correction=0)
    if method == "local_scaling":
        return (dist[:, neighbors - 1],)
    if method == "nicdm":
        return (dist[:, :neighbors].mean(dim=1),)
    return ((1.0 - dist[:, :neighbors]).mean(dim=1),)  # csls: mean cosine similarity to the nearest


def _secondary(method, d, query_stats, ref_stats):
    if method == "mutual_proximity":
        (mu_i, sd_i), (mu_j, sd_j) = query_stats, ref_stats
        return 1.0 - _normal_sf(d, mu_i[:, None], sd_i[:, None]) * _normal_sf(d, mu_j, sd_j)
    (s_i,), (s_j,) = query_stats, ref_stats
    if method == "local_scaling":
        return 1.0 - torch.exp(-d * d / (s_i[:, None] * s_j))
    if method == "nicdm":
        return d / torch.sqrt(s_i[:, None] * s_j)
    return s_i[:, None] + s_j - 2.0 * (1.0 - d)  # csls, negated: r_T(x) + r_S(y) - 2 cos(x, y)


def _check(distances, indices, method, reference_distances, neighbors):
    op = "reduce_hubness"
    _checks.check_tensor(op, "distances", distances, _checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "indices", indices, (torch.int64, torch.int32))
    if distances.dim() != 2 or distances.shape[1] == 0 or indices.shape != distances.shape:
        raise ValueError(f"{op}: distances and indices must both be [n, k] with k >= 1, got "
                         f"{tuple(distances.shape)} and {tuple(indices.shape)}")
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    ref = distances if reference_distances is None else reference_distances
    if reference_distances is not None:
        _checks.check_tensor(op, "reference_distances", reference_distances, _checks.FLOAT_DTYPES)
        if reference_distances.dim() != 2 or reference_distances.shape[1] == 0:
            raise ValueError(f"{op}: reference_distances must be [m, k'], got {tuple(reference_distances.shape)}")
        if reference_distances.device != distances.device:
            raise ValueError(f"{op}: reference_distances is on {reference_distances.device}, distances on "
                             f"{distances.device}")
    if indices.device != distances.device:
        raise ValueError(f"{op}: indices is on {indices.device}, distances on {distances.device}")
    if indices.device.type == "cpu" and indices.numel() and \
            not bool(((indices >= 0) & (indices < ref.shape[0])).all()):
        where = "rows of reference_distances" if reference_distances is not None else \
            "rows (the lists index their own set when reference_distances is None)"
        raise ValueError(f"{op}: indices must lie in [0, {ref.shape[0]}), the {where}")
    columns = min(distances.shape[1], ref.shape[1])
    if method == "mutual_proximity":
        if neighbors is not None:
            raise ValueError(f"{op}: mutual_proximity uses every column of the lists; neighbors must be None")
        return None
    if neighbors is None:
        return min(DEFAULT_NEIGHBORS[method], columns)
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or not 1 <= neighbors <= columns:
        raise ValueError(f"{op}: neighbors must be an int in [1, {columns}] (the columns of the lists), "
                         f"got {neighbors!r}")
    return neighbors


def reduce_hubness(distances, indices, method, *, reference_distances=None, neighbors=None):
    """Re-rank k-NN lists with a secondary distance that reduces hubness.

    Args:
        distances, indices: [n, k] k-NN lists of the queries, nearest first (fastnotes.hubness.knn).
            The distances are used as given: pass their sqrt for Euclidean semantics of squared ones.
        method:
            "mutual_proximity": 1 - SF(d_ij; mu_i, sd_i) SF(d_ij; mu_j, sd_j), Gaussian, with (mu, sd)
                (ddof 0) over each point's k listed distances (scikit-hubness's k-NN-graph form).
            "local_scaling": 1 - exp(-d_ij^2 / (sigma_i sigma_j)), sigma = distance to the
                neighbors-th nearest (default 5).
            "nicdm": d_ij / sqrt(r_i r_j), r = mean distance to the `neighbors` nearest (default 5).
            "csls": r_T(x) + r_S(y) - 2 cos(x, y) (CSLS negated), for cosine distances d = 1 - cos;
                r = mean cosine to the `neighbors` nearest of the other side (default 10).
        reference_distances: [m, k'] nearest-first distances of each reference point, giving the
            statistics of the listed neighbours j (for csls: each target's distances to its nearest
            sources). None: the lists are of one set onto itself, so row j of `distances` serves.
        neighbors: see method (clipped to the list length when left at its default).
    Returns:
        (secondary [n, k], indices [n, k]) with each row re-sorted ascending by (secondary, index).
    """
    neighbors = _check(distances, indices, method, reference_distances, neighbors)
    work = distances.double()
    ref = work if reference_distances is None else reference_distances.double()
    indices = indices.long()
    query_stats = _row_statistics(method, work, neighbors)
    ref_stats = tuple(s[indices] for s in _row_statistics(method, ref, neighbors))
    secondary = _secondary(method, work, query_stats, ref_stats)
    by_index = torch.sort(indices, dim=1, stable=True).indices
    order = by_index.gather(1, torch.sort(secondary.gather(1, by_index), dim=1, stable=True).indices)
    out_dtype = distances.dtype if distances.dtype in (torch.float32, torch.float64) else torch.float32
    return secondary.gather(1, order).to(out_dtype), indices.gather(1, order)
