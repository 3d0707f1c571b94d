"""Exact k-NN and k-occurrence by float64 brute force (specs/hubness.md, sections 6 and 9): the full
distance matrix, a stable sort per row (ties to the smaller index), self removed by index. The test
oracle and the fallback backend; memory O(n_q n_r)."""
import torch

METRICS = ("sqeuclidean", "cosine", "ip")
_ROWS_PER_BLOCK = 256


def unit_rows(x):
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))  # a zero row has cosine distance 1


def pairwise_distances(x, reference, metric="sqeuclidean"):
    """[n_q, n_r] float64 distances: sqeuclidean = sum of squared differences (computed directly,
    exact for small integers), cosine = 1 - <x/|x|, y/|y|> (zero rows: 1), ip = -<x, y>."""
    x, reference = x.double(), reference.double()
    if metric == "sqeuclidean":
        blocks = [((x[i:i + _ROWS_PER_BLOCK, None, :] - reference[None, :, :]) ** 2).sum(-1)
                  for i in range(0, x.shape[0], _ROWS_PER_BLOCK)]
        return torch.cat(blocks) if blocks else x.new_zeros(0, reference.shape[0])
    if metric == "cosine":
        return 1.0 - unit_rows(x) @ unit_rows(reference).T
    if metric == "ip":
        return -(x @ reference.T)
    raise ValueError(f"unknown metric {metric!r}")


def knn(x, reference=None, k=1, metric="sqeuclidean", exclude_self=True):
    """(distances [n_q, k] float64, indices [n_q, k] int64) sorted by (distance, index). With
    reference None (or x itself) the set is its own reference, and exclude_self drops query i from
    its own list by index (a duplicate of i stays a neighbour at distance 0). NaN sorts last."""
    same = reference is None or reference is x
    reference = x if reference is None else reference
    dist = pairwise_distances(x, reference, metric)
    order = torch.sort(dist, dim=1, stable=True).indices
    if same and exclude_self:
        n = x.shape[0]
        keep = order != torch.arange(n, device=order.device)[:, None]
        order = order[keep].view(n, n - 1)
    indices = order[:, :k]
    return dist.gather(1, indices), indices


def k_occurrence(x, reference=None, k=1, metric="sqeuclidean", exclude_self=True):
    """counts [n_r] int64: N_k(r), how many query rows have r among their k nearest."""
    n_ref = x.shape[0] if reference is None else reference.shape[0]
    _, indices = knn(x, reference, k, metric, exclude_self)
    return torch.bincount(indices.reshape(-1), minlength=n_ref)
