"""Exact k-NN and k-occurrence by float64 brute force (docs/hubness.md): the full
distance matrix from direct differences, a stable sort per row (ties to the smaller index), self
removed by index. The test oracle and the fallback backend; memory O(n_q n_r)."""
import torch

METRICS = ("sqeuclidean", "cosine", "ip")
_ELEMENTS_PER_BLOCK = 1 << 22


def unit_rows(x):
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))  # a zero row stays zero


def paired_distances(x, y, metric="sqeuclidean"):
    """float64 distances between the rows of x [..., d] and y [..., d] (broadcast), computed directly:
    sqeuclidean = sum (x - y)^2, cosine = |x/|x| - y/|y||^2 / 2 = 1 - cos (1 when either is zero),
    ip = -<x, y>. Differences of float32 values are exact in float64, so near points lose nothing to
    cancellation (1 - <x^, y^> would: cosine distances ~1e-7 apart are noise in float32). Differentiable."""
    x, y = x.double(), y.double()
    if metric == "ip":
        return -(x * y).sum(-1)
    if metric == "cosine":
        nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        ny = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        half = ((x / torch.where(nx > 0, nx, 1.0) - y / torch.where(ny > 0, ny, 1.0)) ** 2).sum(-1) / 2
        return torch.where(((nx == 0) | (ny == 0))[..., 0], 1.0, half)
    if metric == "sqeuclidean":
        return ((x - y) ** 2).sum(-1)
    raise ValueError(f"unknown metric {metric!r}")


def pairwise_distances(x, reference, metric="sqeuclidean"):
    """[n_q, n_r] float64 paired_distances of every query row with every reference row, in row blocks."""
    rows = max(1, _ELEMENTS_PER_BLOCK // max(1, reference.shape[0] * reference.shape[1]))
    blocks = [paired_distances(x[i:i + rows, None, :], reference[None, :, :], metric)
              for i in range(0, x.shape[0], rows)]
    return torch.cat(blocks) if blocks else x.new_zeros(0, reference.shape[0], dtype=torch.float64)


def knn(x, reference=None, k=1, metric="sqeuclidean", exclude_self=True, rank_dtype=None):
    """(distances [n_q, k] float64, indices [n_q, k] int64) sorted by (distance, index). With
    reference None (or x itself) the set is its own reference, and exclude_self drops query i from
    its own list by index (a duplicate of i stays a neighbour at distance 0). rank_dtype (e.g.
    torch.float32): rank by the distances rounded to it, as the returned float32 distances must read
    (two distances that round to the same float32 tie, and the smaller index goes first). NaN ranks
    as +inf."""
    same = reference is None or reference is x
    reference = x if reference is None else reference
    dist = pairwise_distances(x, reference, metric)
    key = dist if rank_dtype is None else dist.to(rank_dtype).double()
    order = torch.sort(torch.nan_to_num(key, nan=float("inf")), dim=1, stable=True).indices
    if same and exclude_self:
        n = x.shape[0]
        keep = order != torch.arange(n, device=order.device)[:, None]
        order = order[keep].view(n, n - 1)
    indices = order[:, :k]
    return dist.gather(1, indices), indices


def k_occurrence(x, reference=None, k=1, metric="sqeuclidean", exclude_self=True, rank_dtype=None):
    """counts [n_r] int64: N_k(r), how many query rows have r among their k nearest."""
    n_ref = x.shape[0] if reference is None else reference.shape[0]
    _, indices = knn(x, reference, k, metric, exclude_self, rank_dtype)
    return torch.bincount(indices.reshape(-1), minlength=n_ref)
