"""k-NN candidates on the CPU: BLAS distance tiles + a running per-row top-k.

The distance matrix is never materialised. Queries go in blocks of TILE_Q rows; for each block the
reference set streams through in blocks of TILE_R rows. A tile [TILE_Q, TILE_R] (2 MB in float32,
reused by its thread) receives s = x.y from single-threaded BLAS (torch.mm), and a Numba scan
(nogil) folds it into each query row's running top-k. Query blocks run on one Python thread per
core: no OpenMP team, so no barriers and no spinning idle workers competing with the scan.

What the scan ranks is v = add_j + scale s_ij, the part of the distance that depends on the reference
(scaling by -2 or -1 is exact, so v is what a GEMM of the scaled x would give, without its copy).
The caller (fastnotes/hubness/_exact.py) passes centred rows, add and scale, keeps k + a margin of
candidates and makes the selection exact by recomputing their distances directly.
A tile row is read in chunks of CHUNK entries: a vectorised pass counts the entries at or below the
row's current k-th best value, and only chunks with such an entry take the scalar insertion path.
After the first few tiles almost no chunk does, so an entry costs about one compare.

Order: (v, index) ascending; references stream in increasing index, so a newcomer that ties the k-th
best has a larger index than everything kept and loses, except to an empty slot (index n_r).
Self-exclusion is by index: the launcher passes the global index of query row 0 in the reference set
and the insertion skips that column. NaN values (only from overflow: inputs are checked finite) rank
as +inf, so every row fills its k slots.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS
from ._tensors import compute_view

TILE_Q = 512
TILE_R = 1024
CHUNK = 64
SERIAL_WORK = 1 << 22  # multiply-adds below which threads cost more than they save
METRICS = {"sqeuclidean": 0, "ip": 1, "cosine": 2}
_JIT = dict(JIT_OPTIONS, cache=True)
_THREADS_LOCK = threading.Lock()


@njit(**_JIT)
def _count_candidates(s, add, scale, thr):
    """How many add_j + scale s_j are not above thr (NaN counts: it ranks as +inf). Views indexed from 0
    so the loop vectorises."""
    one = s.dtype.type(1.0)
    zero = s.dtype.type(0.0)
    n = zero
    for j in range(s.shape[0]):
        n += zero if add[j] + scale * s[j] > thr else one
    return n


@njit(**_JIT)
def _insert_chunk(s, add, scale, col0, self_col, best_d, best_i):
    """Insert the chunk's entries that beat the k-th best under (value, index), NaN as +inf, never
    the column self_col; col0 is the global reference index of s[0]."""
    k = best_d.shape[0]
    inf = s.dtype.type(np.inf)
    for j in range(s.shape[0]):
        v = add[j] + scale * s[j]
        v = inf if np.isnan(v) else v
        index = col0 + j
        if (v < best_d[k - 1] or (v == best_d[k - 1] and index < best_i[k - 1])) and index != self_col:
            p = k - 1
            while p > 0 and (best_d[p - 1] > v or (best_d[p - 1] == v and best_i[p - 1] > index)):
                best_d[p] = best_d[p - 1]
                best_i[p] = best_i[p - 1]
                p -= 1
            best_d[p] = v
            best_i[p] = index


@njit(nogil=True, **_JIT)
def _scan_tile(tile, add, scale, ref0, self_col0, best_d, best_i):
    """Fold tile [bq, br] = x.y (references ref0 .. ref0 + br) into the top-k of best_d/best_i [bq, k].
    Query row i is reference self_col0 + i (self_col0 < -bq when nothing is excluded)."""
    bq, br = tile.shape
    k = best_d.shape[1]
    scale = tile.dtype.type(scale)
    for i in range(bq):
        row = tile[i]
        bd = best_d[i]
        bi = best_i[i]
        for c0 in range(0, br, CHUNK):
            c1 = min(c0 + CHUNK, br)
            if _count_candidates(row[c0:c1], add[c0:c1], scale, bd[k - 1]) > 0:
                _insert_chunk(row[c0:c1], add[c0:c1], scale, ref0 + c0, self_col0 + i, bd, bi)


def candidates(x, ref, add, scale, k, exclude_self):
    """(v [n, k], indices [n, k] int64): each query row's k best references by (v, index), ascending,
    v = add_j + scale <x_i, ref_j>. x, ref: contiguous float32/float64 CPU tensors (`ref is x` for
    one set, then exclude_self drops query i from its own list), add [m] of the same dtype. Slots
    that no reference filled (k > the references left) hold (+inf, m)."""
    n, n_ref = x.shape[0], ref.shape[0]
    same = ref is x
    add_np = add.numpy()
    best_d = np.full((n, k), np.inf, dtype=add_np.dtype)
    best_i = np.full((n, k), n_ref, dtype=np.int64)

    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        rows = max(1, min(TILE_Q, -(-n // threads)))  # small n: still one block per thread
        blocks = range(0, n, rows)

        def query_block(q0):
            q1 = min(q0 + rows, n)
            self_col0 = q0 if (same and exclude_self) else -n - 1  # query i is reference self_col0 + i
            tile = torch.empty((q1 - q0) * min(TILE_R, n_ref), dtype=x.dtype)
            for r0 in range(0, n_ref, TILE_R):
                r1 = min(r0 + TILE_R, n_ref)
                out = tile[:(q1 - q0) * (r1 - r0)].view(q1 - q0, r1 - r0)
                torch.mm(x[q0:q1], ref[r0:r1].T, out=out)
                _scan_tile(out.numpy(), add_np[r0:r1], scale, r0, self_col0, best_d[q0:q1], best_i[q0:q1])

        workers = min(threads, len(blocks))
        if workers <= 1 or n * n_ref * x.shape[1] < SERIAL_WORK:
            for q0 in blocks:
                query_block(q0)
            return torch.from_numpy(best_d), torch.from_numpy(best_i)
        # One Python thread per core, each running single-threaded BLAS + the nogil scan on its own
        # query blocks: no OpenMP team, so no barriers and no spinning workers competing with the
        # scan (torch's multithreaded mm alternating with a parallel scan ran 3-5x slower on this
        # machine under load). torch's thread count is global: it reads 1 only while this runs, and
        # the lock keeps a concurrent call from taking that 1 for the user's setting.
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(query_block, blocks))
        finally:
            torch.set_num_threads(threads)
    return torch.from_numpy(best_d), torch.from_numpy(best_i)



@njit(parallel=True, **dict(_JIT, fastmath=False))  # IEEE: x^ - x^ must be exactly 0
def _paired(x, ref, rows, indices, metric, out):
    n, c = indices.shape
    d = x.shape[1]
    for i in prange(n):
        q = x[rows[i]]
        q_norm = 0.0
        for t in range(d):
            q_norm += np.float64(q[t]) * np.float64(q[t])
        q_norm = np.sqrt(q_norm)
        for p in range(c):
            y = ref[indices[i, p]]
            acc = 0.0
            if metric == 0:
                for t in range(d):
                    diff = np.float64(q[t]) - np.float64(y[t])
                    acc += diff * diff
            elif metric == 1:
                for t in range(d):
                    acc -= np.float64(q[t]) * np.float64(y[t])
            else:
                y_norm = 0.0
                for t in range(d):
                    y_norm += np.float64(y[t]) * np.float64(y[t])
                y_norm = np.sqrt(y_norm)
                if q_norm == 0.0 or y_norm == 0.0:
                    acc = 1.0
                else:
                    for t in range(d):
                        diff = np.float64(q[t]) / q_norm - np.float64(y[t]) / y_norm
                        acc += diff * diff
                    acc /= 2.0
            out[i, p] = acc


def paired_distances(x, ref, rows, indices, metric):
    """float64 [r, c]: the distance of x[rows[i]] and ref[indices[i, p]] computed directly, as
    fastnotes.reference.hubness.paired_distances does with torch ops, in one parallel pass with no
    [r, c, d] temporaries. x, ref: CPU tensors (16-bit ones are widened); indices < len(ref)."""
    out = np.empty(tuple(indices.shape), dtype=np.float64)
    # numba's OpenMP layer shares torch's libgomp, and starting it sets the OpenMP thread count to
    # numba's: run on torch's count and keep it, so a process set to 1 thread (a rank of a group)
    # stays at 1 instead of oversubscribing the cores in every torch op from then on
    threads = torch.get_num_threads()
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        _paired(compute_view(x).numpy(), compute_view(ref).numpy(), rows.numpy(), indices.numpy(),
                METRICS[metric], out)
    finally:
        numba.set_num_threads(previous)
        torch.set_num_threads(threads)
    return torch.from_numpy(out)
