"""k-NN candidates on the GPU. Math: docs/hubness.md; the caller is fastnotes/hubness/_exact.py.

distance_keys_kernel: grid (query blocks, reference blocks) over one tile of the matrix of ranking
values v = add_j + scale <x_i, y_j> (x and y centred float32 rows from the caller; IEEE fp32 dot
products, no TF32: it flips near-ties). Each value is written as an int64 key

    key = (order-preserving int32 of the fp32 value) << 32 | reference index,

so integer order on keys is the total order (value, then the smaller index), and selecting the k
smallest keys needs no tie rule. NaN values become +inf; -0.0 becomes +0.0. Self pairs (by index,
when exclude_self) get KEY_EXCLUDED, which sorts after every real key.

knn_keys streams tiles of at most TILE_ELEMENTS keys (query rows x reference columns) and merges each
into a running per-row top-k, so memory is O(n k + tile), never the [n, m] matrix. Here the merge is
torch.topk on the concatenation (keys are unique, so topk is exact); kernels/cuda/hubness.py passes
the CUDA C++ merge from fastnotes._C instead. The caller keeps k + a margin of candidates and
recomputes their distances directly.
"""
import torch
import triton
import triton.language as tl

KEY_EXCLUDED = 2**63 - 1
_KEY_EXCLUDED = tl.constexpr(KEY_EXCLUDED)
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 16
NUM_WARPS = 8
TILE_ELEMENTS = 1 << 24  # keys per tile: 128 MiB of int64 on the GPU
TILE_COLS = 4096


@triton.jit
def distance_keys_kernel(x_ptr, ref_ptr, add_ptr, keys_ptr, scale, n_rows, n_cols, dim, row_start, col_start,
                         keys_stride, EXCLUDE_SELF: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    query = row_start + rows.to(tl.int64)
    ref = col_start + cols.to(tl.int64)
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        q = tl.load(x_ptr + query[:, None] * dim + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        r = tl.load(ref_ptr + ref[:, None] * dim + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        dot = tl.dot(q, tl.trans(r), dot, input_precision="ieee")
    add = tl.load(add_ptr + ref, mask=col_ok, other=0.0)
    value = add[None, :] + scale * dot
    value = tl.where(value != value, float("inf"), value)
    value = tl.where(value == 0.0, 0.0, value)
    bits = value.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | ref[None, :]
    if EXCLUDE_SELF:
        key = tl.where(query[:, None] == ref[None, :], _KEY_EXCLUDED, key)
    out = keys_ptr + rows[:, None].to(tl.int64) * keys_stride + cols[None, :]
    tl.store(out, key, mask=row_ok[:, None] & col_ok[None, :])


# ---- launch -------------------------------------------------------------------------------------


def distance_keys(x, reference, add, scale, exclude_self, row_start, col_start, out):
    """Keys of queries x[row_start : row_start + out.shape[0]] against references
    reference[col_start : col_start + out.shape[1]], written into `out` (int64, unit column stride)."""
    n_rows, n_cols = out.shape
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_N))
    distance_keys_kernel[grid](x, reference, add, out, scale, n_rows, n_cols, x.shape[1], row_start, col_start,
                               out.stride(0), EXCLUDE_SELF=exclude_self,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return out


def merge_topk(tile, best):
    """best[rows, k] <- the k smallest of best and tile[rows, cols], ascending (keys are unique)."""
    best.copy_(torch.topk(torch.cat([best, tile], dim=1), best.shape[1], dim=1, largest=False).values)


def knn_keys(x, reference, add, scale, k, exclude_self, *, merge=merge_topk, tile_rows=None, tile_cols=None):
    """Each query's k smallest keys [n, k], ascending, streaming tiles of the value matrix."""
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
            distance_keys(x, reference, add, scale, exclude_self, row_start, col_start, tile)
            merge(tile, best[row_start:row_start + rows])
    return best


def decode_keys(keys):
    """(values float32, indices int64) of int64 keys; KEY_EXCLUDED gives (NaN, 2^32 - 1)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def candidates(x, reference, add, scale, k, exclude_self, **tiles):
    """(v [n, k] float32, indices [n, k] int64): each query's k best references by (v, index),
    v = add_j + scale <x_i, reference_j>; x, reference contiguous float32 [n, d], [m, d], add [m]
    float32. Empty slots (k above the references left) decode to (NaN, 2^32 - 1)."""
    return decode_keys(knn_keys(x, reference, add, scale, k, exclude_self, **tiles))


# Every configuration the launchers use, for ahead-of-time compilation in the tests:
# (kernel, signature, constexprs, num_warps).
def _aot_configs():
    configs = []
    for exclude_self in (False, True):
        configs.append((distance_keys_kernel,
                        {"x_ptr": "*fp32", "ref_ptr": "*fp32", "add_ptr": "*fp32", "keys_ptr": "*i64", "scale": "fp32",
                         "n_rows": "i32", "n_cols": "i32", "dim": "i32", "row_start": "i32", "col_start": "i32",
                         "keys_stride": "i32", "EXCLUDE_SELF": "constexpr", "BLOCK_M": "constexpr",
                         "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                        {"EXCLUDE_SELF": exclude_self, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K},
                        NUM_WARPS))
    return configs


AOT_CONFIGS = _aot_configs()
