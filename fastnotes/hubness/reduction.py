"""Hubness reduction (docs/hubness.md): secondary distances computed from the k-NN lists
and re-ranking. All keep "smaller = closer". Plain torch post-passes, O(n k)."""
import math

import torch

from .. import _checks

METHODS = ("mutual_proximity", "local_scaling", "nicdm", "csls", "dissim_local")
DEFAULT_NEIGHBORS = {"local_scaling": 5, "nicdm": 5, "csls": 10, "dissim_local": 5}


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


def _check_vectors(op, distances, indices, vectors, reference_vectors, reference_indices):
    if vectors is None:
        raise ValueError(f"{op}: dissim_local needs vectors (the query points [n, d])")
    for name, value in (("vectors", vectors), ("reference_vectors", reference_vectors)):
        if value is not None:
            _checks.check_tensor(op, name, value, _checks.FLOAT_DTYPES)
            if value.dim() != 2 or value.device != distances.device:
                raise ValueError(f"{op}: {name} must be a 2-D tensor on {distances.device}")
    if vectors.shape[0] != distances.shape[0]:
        raise ValueError(f"{op}: vectors has {vectors.shape[0]} rows but the lists have {distances.shape[0]}")
    ref = vectors if reference_vectors is None else reference_vectors
    if ref.shape[1] != vectors.shape[1]:
        raise ValueError(f"{op}: reference_vectors must have {vectors.shape[1]} columns like vectors")
    lists = indices if reference_indices is None else reference_indices
    if reference_indices is not None:
        _checks.check_tensor(op, "reference_indices", reference_indices, (torch.int64, torch.int32))
        if reference_indices.dim() != 2 or reference_indices.shape[0] != ref.shape[0]:
            raise ValueError(f"{op}: reference_indices must be [{ref.shape[0]}, k'], one list per reference point")
    elif ref.shape[0] != distances.shape[0]:
        raise ValueError(f"{op}: a reference set of another size needs reference_indices (its own k-NN lists)")
    for name, value in (("indices", indices), ("reference_indices", lists)):
        if value.device.type == "cpu" and value.numel() and not bool(((value >= 0) & (value < ref.shape[0])).all()):
            raise ValueError(f"{op}: {name} must lie in [0, {ref.shape[0]}), the reference points")
    return min(indices.shape[1], lists.shape[1])


def _check(distances, indices, method, reference_distances, neighbors, vectors=None, reference_vectors=None,
           reference_indices=None):
    op = "reduce_hubness"
    _checks.check_tensor(op, "distances", distances, _checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "indices", indices, (torch.int64, torch.int32))
    if distances.dim() != 2 or distances.shape[1] == 0 or indices.shape != distances.shape:
        raise ValueError(f"{op}: distances and indices must both be [n, k] with k >= 1, got "
                         f"{tuple(distances.shape)} and {tuple(indices.shape)}")
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    if indices.device != distances.device:
        raise ValueError(f"{op}: indices is on {indices.device}, distances on {distances.device}")
    if method == "dissim_local":
        columns = _check_vectors(op, distances, indices, vectors, reference_vectors, reference_indices)
        return _check_neighbors(op, method, neighbors, columns)
    ref = distances if reference_distances is None else reference_distances
    if reference_distances is not None:
        _checks.check_tensor(op, "reference_distances", reference_distances, _checks.FLOAT_DTYPES)
        if reference_distances.dim() != 2 or reference_distances.shape[1] == 0:
            raise ValueError(f"{op}: reference_distances must be [m, k'], got {tuple(reference_distances.shape)}")
        if reference_distances.device != distances.device:
            raise ValueError(f"{op}: reference_distances is on {reference_distances.device}, distances on "
                             f"{distances.device}")
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
    return _check_neighbors(op, method, neighbors, columns)


def _check_neighbors(op, method, neighbors, columns):
    if neighbors is None:
        return min(DEFAULT_NEIGHBORS[method], columns)
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or not 1 <= neighbors <= columns:
        raise ValueError(f"{op}: neighbors must be an int in [1, {columns}] (the columns of the lists), "
                         f"got {neighbors!r}")
    return neighbors


def _dissim_local(work, indices, neighbors, vectors, reference_vectors, reference_indices):
    """||x - y||^2 - ||x - c(x)||^2 - ||y - c(y)||^2, c = centroid of the `neighbors` nearest
    reference points (Hara et al. 2016)."""
    x = vectors.double()
    y = x if reference_vectors is None else reference_vectors.double()
    lists = indices if reference_indices is None else reference_indices.long()

    def spread(points, neighbour_lists):
        return ((points - y[neighbour_lists[:, :neighbors]].mean(dim=1)) ** 2).sum(dim=1)

    return work - spread(x, indices)[:, None] - spread(y, lists)[indices]


def reduce_hubness(distances, indices, method, *, reference_distances=None, neighbors=None, vectors=None,
                   reference_vectors=None, reference_indices=None):
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
            "dissim_local": d_ij - |x_i - c(x_i)|^2 - |y_j - c(y_j)|^2 for squared Euclidean d, c = the
                centroid of the `neighbors` nearest reference points (default 5); needs `vectors` (the
                queries), and for another reference set `reference_vectors` and `reference_indices`
                (each reference point's own lists). Not shifted to be non-negative (rankings are equal).
        reference_distances: [m, k'] nearest-first distances of each reference point, giving the
            statistics of the listed neighbours j (for csls: each target's distances to its nearest
            sources). None: the lists are of one set onto itself, so row j of `distances` serves.
        neighbors: see method (clipped to the list length when left at its default).
    Returns:
        (secondary [n, k], indices [n, k]) with each row re-sorted ascending by (secondary, index).
    """
    neighbors = _check(distances, indices, method, reference_distances, neighbors, vectors, reference_vectors,
                       reference_indices)
    work = distances.double()
    indices = indices.long()
    if method == "dissim_local":
        secondary = _dissim_local(work, indices, neighbors, vectors, reference_vectors, reference_indices)
    else:
        ref = work if reference_distances is None else reference_distances.double()
        query_stats = _row_statistics(method, work, neighbors)
        ref_stats = tuple(s[indices] for s in _row_statistics(method, ref, neighbors))
        secondary = _secondary(method, work, query_stats, ref_stats)
    by_index = torch.sort(indices, dim=1, stable=True).indices
    order = by_index.gather(1, torch.sort(secondary.gather(1, by_index), dim=1, stable=True).indices)
    out_dtype = distances.dtype if distances.dtype in (torch.float32, torch.float64) else torch.float32
    return secondary.gather(1, order).to(out_dtype), indices.gather(1, order)
