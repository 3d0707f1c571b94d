"""Exact selection on top of the kernels' fast pass (docs/hubness.md, exactness guarantee).

The kernels rank references with one GEMM per tile, by v = add_j + scale <x~_i, y~_j> in float32:
the expanded distance, which cancels when the points sit far from the origin compared with their
spread (x = 100 + 0.1 randn lost most nearest neighbours). Three steps make the result exact:

1. prepare: both sets are shifted by one point mu close to the mean of the reference set (in float64,
   then rounded to the compute dtype), so the float32 error scales with the spread of the data, not
   with its distance from the origin. v differs from the distance by a per-row constant:
       sqeuclidean  x~ = x - mu            v = |y~|^2 - 2 <x~, y~>   (|x - y|^2 = v + |x~|^2)
       cosine       x~ = x/|x| - mu        v = |y~|^2 - 2 <x~, y~>   (1 - cos = (v + |x~|^2) / 2)
       ip           x~ = x - mu            v = -<mu, y~> - <x~, y~>  (-<x, y> = v - <x, mu>)
   mu is the mean rounded to 12 bits below each column's spread, so x - mu stays exact for integer data.
2. the backend keeps each row's k + MARGIN best by (v, index);
3. refine: the candidates' distances are recomputed directly in float64 (reference.paired_distances),
   rounded once to the output dtype, and each row keeps the k best by (distance, index). A row is
   certified when its last candidate's v exceeds its k-th by more than `bound`: twice the a-priori
   error of v (centring, GEMM and norm rounding: (d + 8) u (|x~_i| + max |y~|)^2 and an underflow
   term) plus the output rounding, so no reference left out can be among the k nearest. Other rows
   (large groups of ties, as in integer data, or overflow) are recomputed over the whole reference
   set with float64 GEMMs.

cosine: zero rows have distance 1 to everything. The fast pass ranks zero references last (v = +inf);
refine adds the first k + 1 of them to every row's candidates, and gives zero query rows the first
k indices (all tie at 1).
"""
import dataclasses

import torch

from ..reference import hubness as oracle

MARGIN = 8  # candidates beyond k: on Gaussian and offset data (d 8..512) fewer than 0.1% of rows go to the fallback
_ROWS = 4096  # rows per float64 chunk in prepare (fewer when d > 64: a chunk stays within 2 MiB)
_ELEMENTS = 1 << 20  # float64 elements per chunk in refine and the fallback (8 MiB: the streamed path's bound)


@dataclasses.dataclass
class Problem:
    x: torch.Tensor  # [n, d] the caller's queries (detached, contiguous)
    ref: torch.Tensor  # [m, d] references; `is x` for one set
    metric: str
    exclude_self: bool  # one set, query i never returns reference i
    out_dtype: torch.dtype
    mu: torch.Tensor  # [d] float64
    xc: torch.Tensor  # [n, d] centred queries in the compute dtype (what the kernel sees)
    rc: torch.Tensor  # [m, d] centred references; `is xc` for one set
    add: torch.Tensor  # [m] compute dtype: v = add + scale <xc, rc>
    scale: float
    bound: torch.Tensor  # [n] float64: certification margin in units of v (+inf: never certified)
    zero_x: torch.Tensor = None  # cosine: [n] bool, zero query rows
    zero_r: torch.Tensor = None  # cosine: [m] bool, zero reference rows
    paired: object = None  # the backend's fused paired_distances(x, ref, rows, indices, metric), if any
    release: object = None  # stream.py: called after each reference chunk of the fallback search (drops mapped pages)
    read_rows: object = None  # stream.py: indices -> (those reference rows read from the file, indices into them)

    @property
    def same(self):
        return self.ref is self.x

    def candidates(self, k):
        """How many candidates per row the backend keeps."""
        return min(k + MARGIN, self.ref.shape[0])


def _chunk(d):
    """Rows per float64 chunk of [rows, d]: _ROWS, fewer for wide rows."""
    return max(1, min(_ROWS, (1 << 18) // max(d, 1)))


def _rows64(t, metric):
    t = t.double()
    return oracle.unit_rows(t) if metric == "cosine" else t


def column_sum(ref, metric, total=None):
    """float64 [d]: the sum of the rows the centring averages (unit rows for cosine), in _chunk rows,
    added to `total` (for a set read in tiles)."""
    if total is None:
        total = torch.zeros(ref.shape[1], dtype=torch.float64, device=ref.device)
    return sum((_rows64(c, metric).sum(0) for c in ref.split(_chunk(ref.shape[1]))), total)


def column_spread(ref, metric, mean, spread=None):
    """float64 [d]: the largest |row - mean| of each column (0 for no rows), or of `spread` if larger."""
    if spread is None:
        spread = torch.zeros(ref.shape[1], dtype=torch.float64, device=ref.device)
    for c in ref.split(_chunk(ref.shape[1])) if ref.shape[0] else ():
        spread = torch.maximum(spread, (_rows64(c, metric) - mean).abs().amax(0))
    return spread


def round_centre(mean, spread):
    """mu: the mean rounded per column to a multiple of 2^-12 of a power of two below the column's
    spread (its magnitude for a constant column)."""
    spread = torch.where(spread > 0, spread, mean.abs())
    step = torch.exp2(torch.floor(torch.log2(spread)) - 12)
    return torch.where(step > 0, torch.round(mean / step) * step, mean)


def _centre(ref, metric):
    """mu for one process: the reference mean, rounded (round_centre). distributed.py sums the
    column_sum of every rank's shard instead."""
    mean = column_sum(ref, metric) / ref.shape[0]
    return round_centre(mean, column_spread(ref, metric, mean))


def _shifted(t, mu, metric, dtype):
    """(t - mu in `dtype`, float64 norms of the rounded rows)."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    norms = torch.empty(t.shape[0], dtype=torch.float64, device=t.device)
    step = _chunk(t.shape[1])
    for start in range(0, t.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = _rows64(t[rows], metric) - mu
        norms[rows] = torch.linalg.vector_norm(out[rows].double(), dim=1)
    return out, norms


def certification_bound(metric, mu, d, x_norms, big, compute_dtype, out_dtype):
    """The certification margin (module docstring, step 3) in units of v, float64, for query rows with
    centred norms x_norms (float64); big: the largest centred norm of a ranked (non-zero) reference.
    +inf where v could overflow the compute dtype (never certified)."""
    info = torch.finfo(compute_dtype)
    u, underflow = info.eps / 2, info.tiny * info.eps
    if metric == "ip":
        shift = torch.linalg.vector_norm(mu)
        scale_i = (x_norms + shift) * big  # |<x~, y~>| + |<mu, y~>|
        magnitude = (x_norms + shift) * (big + shift)  # |<x, y>|
    else:
        shift = x_norms.new_zeros(())
        scale_i = magnitude = (x_norms + big) ** 2
    err = (d + 8) * (u * scale_i + underflow)
    if metric == "cosine":  # x/|x| - mu is rounded in float64 before the compute dtype: absolute error
        eps64 = (d + 2) * 2.0 ** -53
        err = err + 4 * eps64 * (x_norms + big) + 4 * eps64 ** 2
    bound = 2 * err + 3 * (torch.finfo(out_dtype).eps / 2) * magnitude
    # v cannot overflow the compute dtype where every term stays below max / 4
    safe = 4 * (x_norms + big + shift) ** 2 < info.max
    return torch.where(safe, bound, float("inf"))


def prepare(x, ref, metric, exclude_self, compute_dtype, out_dtype, paired=None):
    """The centred problem for the kernels (module docstring, step 1). `ref is x` for one set;
    paired: a backend's fused version of the direct distances of step 3 (numba), or None (torch)."""
    same = ref is x
    mu = _centre(ref, metric)
    xc, x_norms = _shifted(x, mu, metric, compute_dtype)
    rc, r_norms = (xc, x_norms) if same else _shifted(ref, mu, metric, compute_dtype)
    d = x.shape[1]
    zero_x = zero_r = None
    if metric == "ip":
        add = -(rc.double() @ mu)
        scale = -1.0
    else:
        add = r_norms ** 2
        scale = -2.0
    if metric == "cosine":
        zero_x = torch.linalg.vector_norm(x.double(), dim=1) == 0
        zero_r = zero_x if same else torch.linalg.vector_norm(ref.double(), dim=1) == 0
        add = torch.where(zero_r, float("inf"), add)
    add = add.to(compute_dtype)

    big = (r_norms if zero_r is None else torch.where(zero_r, 0.0, r_norms)).max()  # zero rows: not ranked
    bound = certification_bound(metric, mu, d, x_norms, big, compute_dtype, out_dtype)
    return Problem(x, ref, metric, exclude_self, out_dtype, mu, xc, rc, add, scale, bound, zero_x, zero_r, paired)


def _select(values, indices, k):
    """The k best of each row by (values, indices): a stable sort by index, then one by value."""
    by_index = torch.sort(indices, dim=1, stable=True)
    values = values.gather(1, by_index.indices)
    by_value = torch.sort(values, dim=1, stable=True)
    return by_value.values[:, :k], by_index.values.gather(1, by_value.indices[:, :k])


def direct_distances(x, ref, rows, indices, metric, paired=None):
    """float64 [b, c]: the distance of x[rows[i]] and ref[indices[i, p]] computed directly
    (reference.paired_distances; `paired` is a backend's fused version of it). indices < len(ref)."""
    if paired is not None:
        return paired(x, ref, rows, indices, metric)
    out = torch.empty(indices.shape, dtype=torch.float64, device=indices.device)
    step = max(1, _ELEMENTS // max(1, indices.shape[1] * x.shape[1]))
    with torch.no_grad():
        for start in range(0, indices.shape[0], step):
            part = slice(start, start + step)
            out[part] = oracle.paired_distances(x[rows[part], None, :], ref[indices[part]], metric)
    return out


def rounded(distances, out_dtype):
    """float64 distances rounded once to the output dtype (and back), NaN as +inf: the ranking key."""
    return torch.nan_to_num(distances.to(out_dtype).double(), nan=float("inf"))


def _exact(p, rows, indices, invalid):
    """Directly computed distances of the (row, indices) pairs, rounded to the output dtype and back
    (NaN and invalid pairs as +inf); invalid indices become m so that they lose every tie."""
    m = p.ref.shape[0]
    safe = torch.where(invalid, 0, indices)
    ref = p.ref
    if p.read_rows is not None:  # scattered rows of a mapped file: read them, not fault them in
        ref, safe = p.read_rows(safe)
    out = rounded(direct_distances(p.x, ref, rows, safe, p.metric, p.paired), p.out_dtype)
    return torch.where(invalid, float("inf"), out), torch.where(invalid, m, indices)


def _invalid(p, rows, indices):
    """Candidates of the fast pass to drop: empty slots, self, zero references (cosine: added apart)."""
    bad = indices >= p.ref.shape[0]
    if p.exclude_self:
        bad |= indices == rows[:, None]
    if p.zero_r is not None:
        bad |= p.zero_r[torch.where(bad, 0, indices)]
    return bad


def search_tile(x64, y, start, metric, mu, out_dtype, zero_x=None, self_index=None, sentinel=None):
    """(distances [r, c] float64, indices [r, c]) of query rows x64 (_rows64 of them) against the
    reference rows y [c, d] with indices start.., by float64 GEMMs on data centred by mu, rounded to
    out_dtype (NaN as +inf). cosine: zero_x [r] marks zero query rows (distance 1 to everything).
    self_index [r]: each row's own reference index, returned as (+inf, sentinel)."""
    y64 = _rows64(y, metric)
    if metric == "ip":  # float32 products are exact in float64; no shift needed
        dist = -(x64 @ y64.T)
    else:
        xs, ys = x64 - mu, y64 - mu
        dist = ((xs * xs).sum(1)[:, None] + (ys * ys).sum(1)[None, :] - 2 * (xs @ ys.T)).clamp_(min=0)
        if metric == "cosine":
            zero_y = torch.linalg.vector_norm(y.double(), dim=1) == 0
            dist = torch.where(zero_x[:, None] | zero_y[None, :], 1.0, dist / 2)
    index = torch.arange(start, start + dist.shape[1], device=x64.device).expand_as(dist)
    dist = rounded(dist, out_dtype)
    if self_index is not None:
        own = index == self_index[:, None]
        dist, index = torch.where(own, float("inf"), dist), torch.where(own, sentinel, index)
    return dist, index


def search_columns(rows, d):
    """Reference rows per search_tile call: the [rows, cols] distances and the [cols, d] float64 tile
    both stay bounded."""
    return max(1, _ELEMENTS // max(rows, d, 1))


def _full_search(p, rows, k):
    """The k best of every reference for the given rows, with float64 GEMMs on the centred data,
    ranked by (distance rounded to the output dtype, index)."""
    m = p.ref.shape[0]
    x64 = _rows64(p.x[rows], p.metric)
    best_d = torch.full((len(rows), k), float("inf"), dtype=torch.float64, device=rows.device)
    best_i = torch.full((len(rows), k), m, dtype=torch.int64, device=rows.device)
    zero_x = p.zero_x[rows] if p.zero_x is not None else None
    cols = min(m, search_columns(len(rows), p.x.shape[1]))
    for start in range(0, m, cols):
        dist, index = search_tile(x64, p.ref[start:start + cols], start, p.metric, p.mu, p.out_dtype, zero_x,
                                  rows if p.exclude_self else None, m)
        best_d, best_i = _select(torch.cat([best_d, dist], 1), torch.cat([best_i, index], 1), k)
        if p.release is not None:
            p.release()
    return best_i


def refine(p, values, indices, k, rows=None, bound=None):
    """(distances [b, k] in the output dtype, indices [b, k] int64), each row ascending by (distance,
    index), from the backend's candidates (values [b, c], indices [b, c], ascending by (v, index);
    indices >= m mark empty slots). Module docstring, step 3.
    rows: the global indices (into p.x) of the b query rows of a block (stream.py), default all n rows;
    bound: their certification margins ([b] float64), default p.bound."""
    m = p.ref.shape[0]
    if rows is None:
        rows = torch.arange(p.x.shape[0], device=indices.device)
        zero_x = p.zero_x
    else:
        zero_x = p.zero_x[rows] if p.zero_x is not None else None
    bound = p.bound if bound is None else bound
    n = len(rows)
    zero_count = int(p.zero_r.sum()) if p.zero_r is not None else 0
    candidates, invalid = indices, _invalid(p, rows, indices)
    if zero_count:  # all at distance 1: the first k + 1 can be needed
        extra = torch.nonzero(p.zero_r)[:k + 1, 0].expand(n, -1)
        candidates = torch.cat([candidates, extra], 1)
        invalid = torch.cat([invalid, (extra == rows[:, None]) & p.exclude_self], 1)
    dist, cand = _exact(p, rows, candidates, invalid)
    dist, chosen = _select(dist, cand, k)

    reachable = m - (1 if p.exclude_self else 0) - zero_count
    if values.shape[1] < reachable:  # else every reference was a candidate
        v = torch.nan_to_num(values.double(), nan=float("inf"))
        doubtful = ~(v[:, -1] > v[:, k - 1] + bound)
        if zero_x is not None:
            doubtful &= ~zero_x
        redo_local = torch.nonzero(doubtful)[:, 0]
        for redo in redo_local.split(1024) if len(redo_local) else ():
            picked = _full_search(p, rows[redo], k)  # zero references included, self excluded
            dist[redo], chosen[redo] = _select(*_exact(p, rows[redo], picked, picked >= m), k)
    if zero_x is not None and bool(zero_x.any()):  # every distance is 1: the first k indices
        zero = torch.nonzero(zero_x)[:, 0]
        first = torch.arange(k + 1, device=zero.device).expand(len(zero), -1)
        own = (first == rows[zero][:, None]) & p.exclude_self
        _, chosen[zero] = _select(torch.where(own, float("inf"), 1.0), torch.where(own, m, first), k)
        dist[zero] = 1.0
    return dist.to(p.out_dtype), chosen
