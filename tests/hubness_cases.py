"""Shared hubness test helpers: the float64 direct-difference distance oracle and the exact-kNN check."""
import torch


def true_distances(x, reference, metric):
    """float64 [n, m] distances by direct differences (no expanded formula): float32 inputs subtract
    and multiply exactly in float64, so only the final sums round (relative 1e-16)."""
    q, r = x.double().cpu(), reference.double().cpu()
    if metric == "ip":
        return -(q @ r.T)
    zero_q = zero_r = None
    if metric == "cosine":  # 1 - cos = |x/|x| - y/|y||^2 / 2, with distance 1 for a zero vector
        qn, rn = q.norm(dim=1, keepdim=True), r.norm(dim=1, keepdim=True)
        zero_q, zero_r = qn[:, 0] == 0, rn[:, 0] == 0
        q, r = q / torch.where(qn > 0, qn, 1), r / torch.where(rn > 0, rn, 1)
    rows = max(1, (1 << 21) // (r.shape[0] * r.shape[1]))
    dist = torch.cat([((q[i:i + rows, None, :] - r[None, :, :]) ** 2).sum(-1) for i in range(0, q.shape[0], rows)])
    if metric == "cosine":
        dist = torch.where(zero_q[:, None] | zero_r[None, :], 1.0, dist / 2)
    return dist


def float64_slack(x, true, metric):
    """What float64 evaluation may differ by between two direct computations (for float64 output):
    sums of d terms (relative d 2^-53 of the largest products for ip), and for cosine the rounding of
    the unit vectors, ~(d + 2) 2^-53 each, times |x^ - y^| = sqrt(2 D)."""
    d = x.shape[1]
    if metric == "ip":
        return 4 * d * 2.0 ** -53 * (x.double() ** 2).sum(1).max().item()
    if metric == "cosine":
        return 8 * (d + 2) * 2.0 ** -53 * (2 * true[torch.isfinite(true)].max()).sqrt().item()
    return 0.0


def assert_exact(distances, indices, true, k, exclude_self, out_dtype, atol=0.0):
    """knn output against the float64 oracle: position p holds a neighbour whose true distance equals
    the true p-th smallest up to the rounding of the output dtype (only such near-ties may swap), no
    index twice, never self when excluded; distances are the true ones rounded once, rows ascending.
    atol: the float64 evaluation error, which matters for float64 output only."""
    true = true.clone()
    if exclude_self:
        true.fill_diagonal_(float("inf"))
    u = torch.finfo(out_dtype).eps
    if out_dtype == torch.float64:  # sums of d <= 64 terms, maybe in another order than the oracle's
        u = 64 * 2.0 ** -53
    want = torch.sort(true, dim=1, stable=True).values[:, :k]
    indices = indices.cpu()
    got = true.gather(1, indices)
    wrong = ((got - want).abs() > 2 * u * want.abs() + atol).any(1)
    assert not wrong.any(), f"{int(wrong.sum())} of {len(wrong)} rows hold a neighbour that is not among the k nearest"
    assert bool((indices.sort(1).values.diff(dim=1) > 0).all()), "an index appears twice"
    assert distances.dtype == out_dtype
    torch.testing.assert_close(distances.cpu().double(), got, rtol=2 * u, atol=atol)
    d = distances.cpu()
    assert bool(((d[:, 1:] > d[:, :-1]) | ((d[:, 1:] == d[:, :-1]) & (indices[:, 1:] > indices[:, :-1]))).all())
