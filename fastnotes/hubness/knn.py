"""Exact k-NN lists and k-occurrence counts (docs/hubness.md).

The fused kernels never hold the [n_q, n_r] distance matrix: tiles of distances feed a running
per-row top-k of candidates under the total order (value, index); _exact.py centres the data for
them and turns the candidates into the exact k nearest; the counts are taken from those.
"""
import torch

from .. import _checks, _dispatch, _registry
from ..reference import hubness as oracle
from . import _exact, distributed, stream

METRICS = oracle.METRICS


def _why_not(backend, x, k):
    if backend == "cuda":
        return _registry.HUBNESS.unsupported("cuda", candidates=k + _exact.MARGIN, dtype=x.dtype)
    return _dispatch.kernel_reason(_registry.HUBNESS, backend, x, "x")


def check_options(op, k, metric, exclude_self):
    """The non-tensor arguments of knn / k_occurrence, in memory or streamed."""
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"{op}: exclude_self must be a bool, got {exclude_self!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: k must be an int, got {k!r}")


def _check_arguments(op, x, reference, k, metric, exclude_self):
    _checks.check_tensor(op, "x", x, _checks.FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: x is empty (shape {tuple(x.shape)}); it needs at least one row and one column")
    if reference is not None and reference is not x:
        _checks.check_tensor(op, "reference", reference, _checks.FLOAT_DTYPES)
        if reference.dim() != 2 or reference.shape[1] != x.shape[1]:
            raise ValueError(f"{op}: reference must be [m, {x.shape[1]}] like x, got shape {tuple(reference.shape)}")
        if reference.dtype != x.dtype:
            raise TypeError(f"{op}: reference has dtype {reference.dtype} but x has {x.dtype}")
        if reference.device != x.device:
            raise ValueError(f"{op}: reference is on {reference.device} but x is on {x.device}")
    check_options(op, k, metric, exclude_self)
    same = reference is None or reference is x
    n_ref = x.shape[0] if same else reference.shape[0]
    candidates = n_ref - 1 if (same and exclude_self) else n_ref
    if not 1 <= k < candidates:
        what = (f"{n_ref} points with self excluded" if (same and exclude_self)
                else f"a reference set of {n_ref} points")
        raise ValueError(f"{op}: k must satisfy 1 <= k < {candidates} for {what}, got k = {k}")
    if x.device.type == "cpu":  # on CUDA this would be a host sync; the kernels treat NaN as +inf there
        largest = {}
        for name, t in (("x", x), ("reference", x if same else reference)):
            # in row blocks: isfinite on the whole tensor makes [n, d] temporaries
            blocks = [rows.detach().abs().max() for rows in t.split(8192)]
            largest[name] = float(torch.stack(blocks).max()) if blocks else 0.0
            if not largest[name] < float("inf"):
                raise ValueError(f"{op}: {name} contains NaN or infinite values")
        _check_distance_range(op, metric, x.shape[1], largest["x"], largest["reference"], x.dtype)
    return same


def _check_distance_range(op, metric, dim, x_max, ref_max, dtype):
    """ip distances come out in the input's dtype (float32 for 16-bit input) and can overflow it to
    either infinity, where no ranking is right: refuse such data. (sqeuclidean distances overflow only
    to +inf, and rank as tied +inf by index: the rounded distances' order.)"""
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if metric == "ip" and dim * x_max * ref_max > torch.finfo(out_dtype).max:
        raise ValueError(f"{op}: x and reference hold values up to {max(x_max, ref_max):.3g}: their {metric} "
                         f"distances can overflow {str(out_dtype).replace('torch.', '')}; pass float64 tensors "
                         "(or rescale the data)")


def _run(op, x, k, reference, metric, exclude_self):
    """(backend, distances [n, k] in the output dtype, indices [n, k] int64)."""
    same = _check_arguments(op, x, reference, k, metric, exclude_self)
    backend = _dispatch.select(op, x.device.type, lambda b: _why_not(b, x, k))
    xc = x.detach().contiguous()  # the selection has no gradient (knn recomputes distances for autograd)
    ref = xc if same else reference.detach().contiguous()
    wide = x.dtype == torch.float64 and backend in ("numba", "reference")
    out_dtype = torch.float64 if wide else torch.float32
    # float32 by design: autocast would turn the kernels' GEMMs (numba's torch.mm) into bfloat16
    with torch.autocast(x.device.type, enabled=False):
        if backend == "reference":
            distances, indices = oracle.knn(xc, None if same else ref, k, metric, exclude_self, out_dtype)
            return backend, distances.to(out_dtype), indices
        kernels = _registry.HUBNESS.kernels(backend)
        compute_dtype = out_dtype  # float64 only on numba, for float64 input
        problem = _exact.prepare(xc, ref, metric, exclude_self and same, compute_dtype, out_dtype,
                                 getattr(kernels, "paired_distances", None))
        values, candidates = kernels.candidates(problem.xc, problem.rc, problem.add, problem.scale,
                                                problem.candidates(k), problem.exclude_self)
        return (backend, *_exact.refine(problem, values, candidates, k))


def _streamed(op, x, reference, block_rows, ref_rows, progress):
    """True when x or reference is a file / memmap (fastnotes/hubness/stream.py); the streaming
    keywords are refused for in-memory tensors."""
    if stream.is_streamed(x) or stream.is_streamed(reference):
        return True
    for name, value in (("block_rows", block_rows), ("ref_rows", ref_rows), ("progress", progress)):
        if value is not None:
            raise TypeError(f"{op}: {name} applies to streamed input only (x or reference a numpy.memmap "
                            f"or a path to a .npy file), got {name}={value!r} with tensors")
    return False


@_dispatch.eager_op
def knn(x, k, *, reference=None, metric="sqeuclidean", exclude_self=True, block_rows=None, ref_rows=None,
        progress=None, group=None):
    """The k nearest reference rows of every row of x, exactly.

    Args:
        x: [n, d] float32/float16/bfloat16/float64 queries (float64 on numba and reference).
        k: neighbours per row; 1 <= k < m (k < n - 1 when the set is its own reference and self is excluded).
        reference: [m, d] tensor of the same dtype and device, or None: x is its own reference.
        metric: "sqeuclidean" |x - y|^2, "cosine" 1 - <x/|x|, y/|y|> (a zero vector has distance 1 to
            everything), or "ip" -<x, y> (the largest inner product first).
        exclude_self: when reference is None (or is x), query i never returns reference i; a duplicate
            of i is still a neighbour at distance 0. False lets i compete at distance 0.
    Returns:
        (distances [n, k], indices [n, k] int64), each row ascending by (distance, index): ties go to
        the smaller index. distances are float64 for float64 input, float32 otherwise.

    Precision: the distances are the true distances of the given vectors, computed directly in float64
    (sum of squared differences; cosine as |x/|x| - y/|y||^2 / 2; -<x, y>) and rounded once to the
    output dtype, and the lists are the k smallest under (that rounded distance, index), whatever the
    offset and scale of the data (x = 100 + 0.1 randn included): the float32 GEMM pass only proposes
    candidates, on data centred by the reference mean, and a row whose candidates cannot be proven
    complete from the a-priori float32 error bound is redone with float64 GEMMs (fastnotes/hubness/
    _exact.py). The one approximation left: near-ties within float64 rounding (~d 2^-53 of the spread
    of the data) can break either way.

    Autograd: when x or reference requires grad, the distances are recomputed from the selected pairs
    in float64 torch ops (O(n k d) memory) and carry the gradient; the selection itself has none.
    Being plain torch ops, they support double backward.

    Out of core: x (and reference) may also be a numpy.memmap or a path to a float32/float64 `.npy`
    file (opened with mmap_mode="r"); then the rows are read in blocks of `block_rows` queries against
    tiles of `ref_rows` references (defaults: 32 MiB of rows each), so memory stays O(block_rows (d + k)
    + ref_rows d + m) plus the [n, k] result, whatever the size of the file; the lists are those of the
    in-memory call. CPU only, no autograd, numba or triton backend. progress: None shows a tqdm bar
    (when tqdm is installed) on calls that last more than 3 s, True at once, False never.

    Many processes: with group= (a torch.distributed ProcessGroup) every rank passes its contiguous
    row shard of x (and of reference), in group rank order; shards may be uneven, empty, or shorter
    than k. Each rank gets the lists of its own rows, with global indices (the shard's offset plus the
    local index), equal to the single-process op on the concatenated shards; self-exclusion is by
    global index. The reference shards travel around the ring in transfers of `ref_rows` rows
    (default 4 MiB), overlapped with the distance tiles (fastnotes/hubness/distributed.py). A shard
    may be a numpy.memmap / .npy path (read through the map). Every rank raises the same error on bad
    input. No autograd, and no `reference` backend (the fused kernels run on every rank).
    """
    if group is not None:
        return distributed.run("knn", x, k, reference, metric, exclude_self, group, want_lists=True,
                               ref_rows=ref_rows, unused={"block_rows": block_rows, "progress": progress})
    if _streamed("knn", x, reference, block_rows, ref_rows, progress):
        return stream.run("knn", x, k, reference, metric, exclude_self, want_lists=True, block_rows=block_rows,
                          ref_rows=ref_rows, progress=progress)
    _, distances, indices = _run("knn", x, k, reference, metric, exclude_self)
    if torch.is_grad_enabled() and (x.requires_grad or (reference is not None and reference.requires_grad)):
        ref = x if reference is None else reference
        exact = oracle.paired_distances(x[:, None, :], ref[indices], metric)
        return exact.to(distances.dtype), indices
    return distances, indices


@_dispatch.eager_op
def k_occurrence(x, k, *, reference=None, metric="sqeuclidean", exclude_self=True, block_rows=None,
                 ref_rows=None, progress=None, group=None, counts="all"):
    """N_k over the reference set: counts[r] = how many rows of x have reference row r among their k
    nearest (arguments, and the exactness of the lists, as in knn). int64 [m]; counts.sum() == k * n.

    Fused: tiles of distances feed a running per-row top-k of candidates and the counts come from
    the exact lists, so memory is O(n k + one tile), never the [n, m] distance matrix. On CPU the
    numba backend runs one Python thread per torch thread, each with single-threaded BLAS;
    torch.get_num_threads() reads 1 while the call runs and is restored after it.

    Out of core: x (and reference) may be a numpy.memmap or a path to a `.npy` file, streamed in
    blocks as in knn (block_rows, ref_rows, progress there); the counts equal the in-memory call's.

    Many processes: group= as in knn (each rank its row shard). The counts are summed over the ranks:
    counts="all" (default) gives every rank the [m] counts of the whole reference set (all-reduce),
    counts="shard" each rank those of its own reference rows, [m_local] (reduce-scatter). Without
    group= the one process holds every shard, and both give the [m] counts."""
    if group is not None:
        return distributed.run("k_occurrence", x, k, reference, metric, exclude_self, group, want_lists=False,
                               counts=counts, ref_rows=ref_rows,
                               unused={"block_rows": block_rows, "progress": progress})
    if counts not in distributed.COUNTS:
        raise ValueError(f"k_occurrence: counts must be one of {distributed.COUNTS}, got {counts!r}")
    if _streamed("k_occurrence", x, reference, block_rows, ref_rows, progress):
        return stream.run("k_occurrence", x, k, reference, metric, exclude_self, want_lists=False,
                          block_rows=block_rows, ref_rows=ref_rows, progress=progress)
    backend, _, indices = _run("k_occurrence", x, k, reference, metric, exclude_self)
    n_ref = x.shape[0] if reference is None else reference.shape[0]
    if backend == "cuda":  # the extension's integer-atomic count
        return _registry.HUBNESS.kernels("cuda").count(indices, n_ref)
    return torch.bincount(indices.reshape(-1), minlength=n_ref)
