"""Exact k-NN and k-occurrence counting on the GPU. Math: specs/hubness.md section 6.

distance_keys_kernel: grid (query blocks, reference blocks) over one tile of the distance matrix. Each
program accumulates q.r with IEEE fp32 dot products (no TF32: it flips near-ties) and the row norms in
the same pass over d, forms the distance and writes it as an int64 key

    key = (order-preserving int32 of the fp32 distance) << 32 | reference index,

so integer order on keys is the spec's total order (distance, then the smaller index), and selecting
the k smallest keys needs no tie rule. NaN distances become +inf; -0.0 becomes +0.0. Self pairs (by
index, when exclude_self) get KEY_EXCLUDED, which sorts after every real key.

knn_keys streams tiles of at most TILE_ELEMENTS keys (query rows x reference columns) and merges each
into a running per-row top-k, so memory is O(n k + tile), never the [n, m] matrix. Here the merge is
torch.topk on the concatenation (keys are unique, so topk is exact); kernels/cuda/hubness.py passes
the CUDA C++ merge from fastnotes._C instead. knn then recomputes the k squared Euclidean distances
per row directly (see neighbours).

Metrics (distance, smaller = closer): sqeuclidean max(|q|^2 + |r|^2 - 2 q.r, 0); cosine 1 - q.r /
(|q| |r|), with 1 (similarity 0) when either vector is zero; ip -q.r.
"""
import torch
import triton
import triton.language as tl

METRICS = {"sqeuclidean": 0, "cosine": 1, "ip": 2}
KEY_EXCLUDED = 2**63 - 1
_KEY_EXCLUDED = tl.constexpr(KEY_EXCLUDED)
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 16
NUM_WARPS = 8
TILE_ELEMENTS = 1 << 24  # keys per tile: 128 MiB of int64 on the GPU
TILE_COLS = 4096
EXACT_CHUNK_ELEMENTS = 1 << 24  # floats gathered at once to recompute the k squared distances per row


@triton.jit
def distance_keys_kernel(x_ptr, ref_ptr, keys_ptr, n_rows, n_cols, dim, row_start, col_start, keys_stride,
                         METRIC: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    query = row_start + rows.to(tl.int64)
    ref = col_start + cols.to(tl.int64)
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    qq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        q = tl.load(x_ptr + query[:, None] * dim + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        r = tl.load(ref_ptr + ref[:, None] * dim + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if x_ptr.dtype.element_ty == tl.float32:
            dot = tl.dot(q, tl.trans(r), dot, input_precision="ieee")
        else:  # fp16/bf16 products are exact in fp32; the tensor cores accumulate in fp32
            dot = tl.dot(q, tl.trans(r), dot)
        qf = q.to(tl.float32)
        rf = r.to(tl.float32)
        qq += tl.sum(qf * qf, axis=1)
        rr += tl.sum(rf * rf, axis=1)
    if METRIC == 0:
        dist = qq[:, None] + rr[None, :] - 2.0 * dot
        dist = tl.maximum(tl.where(dist != dist, float("inf"), dist), 0.0)
    elif METRIC == 1:
        norms = tl.sqrt(qq)[:, None] * tl.sqrt(rr)[None, :]
        dist = 1.0 - tl.where(norms > 0.0, dot / norms, 0.0)
    else:
        dist = -dot
    dist = tl.where(dist != dist, float("inf"), dist)
    dist = tl.where(dist == 0.0, 0.0, dist)
    bits = dist.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | ref[None, :]
    if EXCLUDE_SELF:
        key = tl.where(query[:, None] == ref[None, :], _KEY_EXCLUDED, key)
    out = keys_ptr + rows[:, None].to(tl.int64) * keys_stride + cols[None, :]
    tl.store(out, key, mask=row_ok[:, None] & col_ok[None, :])


# ---- launch -------------------------------------------------------------------------------------


def distance_keys(x, reference, metric, exclude_self, row_start, col_start, out):
    """Keys of queries x[row_start : row_start + out.shape[0]] against references
    reference[col_start : col_start + out.shape[1]], written into `out` (int64, unit column stride)."""
    n_rows, n_cols = out.shape
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_N))
    distance_keys_kernel[grid](x, reference, out, n_rows, n_cols, x.shape[1], row_start, col_start, out.stride(0),
                               METRIC=METRICS[metric], EXCLUDE_SELF=exclude_self,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return out


def merge_topk(tile, best):
    """best[rows, k] <- the k smallest of best and tile[rows, cols], ascending (keys are unique)."""
    best.copy_(torch.topk(torch.cat([best, tile], dim=1), best.shape[1], dim=1, largest=False).values)


def knn_keys(x, reference, k, metric, exclude_self, *, merge=merge_topk, tile_rows=None, tile_cols=None):
    """Each query's k smallest keys [n, k], ascending, streaming tiles of the distance matrix."""
    n, m = x.shape[0], reference.shape[0]
    tile_cols = max(1, min(m, tile_cols or TILE_COLS))
    tile_rows = max(1, min(n, tile_rows or TILE_ELEMENTS // tile_cols))
    best = torch.full((n, k), KEY_EXCLUDED, dtype=torch.int64, device=x.device)
    if n == 0:
        return best
    buffer = torch.empty(tile_rows, tile_cols, dtype=torch.int64, device=x.device)
    for row_start in range(0, n, tile_rows):
        rows = min(tile_rows, n - row_start)
        for col_start in range(0, m, tile_cols):
            tile = buffer[:rows, :min(tile_cols, m - col_start)]
            distance_keys(x, reference, metric, exclude_self, row_start, col_start, tile)
            merge(tile, best[row_start:row_start + rows])
    return best


def decode_keys(keys):
    """(distances float32, indices int64) of int64 keys."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def encode_keys(distances, indices):
    """The kernel's keys of float32 distances and int64 indices (NaN as +inf, -0.0 as +0.0)."""
    distances = torch.nan_to_num(distances, nan=float("inf"), posinf=float("inf"), neginf=float("-inf")) + 0.0
    bits = distances.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | indices


def neighbours(x, reference, keys, metric):
    """(distances, indices) of the selected keys. Squared Euclidean distances are recomputed as sums of
    squared differences (the expanded |q|^2 + |r|^2 - 2 q.r that ranked them loses ~eps |q|^2 to
    cancellation: a duplicate would not come out at exactly 0) and each row is re-sorted by
    (distance, index); the other metrics come out of the kernel without cancellation."""
    distances, indices = decode_keys(keys)
    if metric != "sqeuclidean" or keys.numel() == 0:
        return distances, indices
    rows = max(1, EXACT_CHUNK_ELEMENTS // max(1, keys.shape[1] * x.shape[1]))
    for start in range(0, x.shape[0], rows):
        chosen = reference[indices[start:start + rows]].float()
        distances[start:start + rows] = (x[start:start + rows, None, :].float() - chosen).pow_(2).sum(-1)
    return decode_keys(torch.sort(encode_keys(distances, indices), dim=1).values)


def knn(x, reference, k, metric, exclude_self):
    """(distances [n, k] float32, indices [n, k] int64), each row ascending by (distance, index)."""
    return neighbours(x, reference, knn_keys(x, reference, k, metric, exclude_self), metric)


def k_occurrence(x, reference, k, metric, exclude_self):
    """counts [m] int64: how many queries have each reference point among their k nearest."""
    indices = knn_keys(x, reference, k, metric, exclude_self).reshape(-1) & 0xFFFFFFFF
    counts = torch.zeros(reference.shape[0], dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, indices, torch.ones_like(indices))


# Every configuration the launchers use, for ahead-of-time compilation in the tests:
# (kernel, signature, constexprs, num_warps).
def _aot_configs():
    configs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for metric in METRICS.values():
            for exclude_self in (False, True):
                configs.append((distance_keys_kernel,
                                {"x_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "keys_ptr": "*i64",
                                 "n_rows": "i32", "n_cols": "i32", "dim": "i32", "row_start": "i32",
                                 "col_start": "i32", "keys_stride": "i32", "METRIC": "constexpr",
                                 "EXCLUDE_SELF": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                                 "BLOCK_K": "constexpr"},
                                {"METRIC": metric, "EXCLUDE_SELF": exclude_self, "BLOCK_M": BLOCK_M,
                                 "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}, NUM_WARPS))
    return configs


AOT_CONFIGS = _aot_configs()
