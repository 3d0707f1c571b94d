"""Relative-position attention with post-softmax corrections on the GPU, FlashAttention-2 style.
Math: docs/attention.md; the diagonal-vector interface is described in
kernels/numba/attention.py (bias_diag, post_diag [H, Lq + Lk - 1] indexed by e = j - i + Lq - 1,
key_bias [B, Lk]; stat = L1 (softmax) or L2 / 2 (l2), so a = exp(s - stat), +inf for empty rows).

forward: grid (query tiles, B * H), online max over key tiles, C multiplies P inside the value
    accumulation but outside the denominator.
backward (deterministic, no atomics):
    dkdv: grid (key tiles, B * H): dK, dV of one key tile per query head (the launcher sums GQA groups)
    dq:   grid (query tiles, B * H): dQ, and the diagonal sums of dS and A * dP for the table
          gradients. A tile's diagonal sums come from a skewed re-read of the tile through a small
          per-program scratch buffer, added into the program's own row of a [programs, Lq + Lk - 1]
          buffer that the launcher sums in a fixed order.
Matrix products accumulate in fp32 on tensor cores: 3xTF32 for float32 inputs (float32 accuracy, not
plain TF32), bf16/fp16 for 16-bit inputs.
Dropout (HAS_DROPOUT): W = C Z with Z = keep / (1 - p), keep the hash of kernels/_dropout.py, recomputed
per tile in every kernel; the normaliser uses the undropped weights.
"""
import torch
import triton
import triton.language as tl

from .._dropout import COL_J, FMIX_1, FMIX_2, ROW_BH, ROW_I, dropout_threshold

SOFTMAX, L2 = 0, 1
NORMALIZER_CODES = {"softmax": SOFTMAX, "l2": L2}
_L2 = tl.constexpr(L2)  # what the kernels compare the runtime normalizer code with
# the hash constants; those >= 2^31 are uint32 literals in Triton, and the others multiply uint32 tensors
_FMIX_1, _FMIX_2 = tl.constexpr(FMIX_1), tl.constexpr(FMIX_2)
_ROW_BH, _ROW_I, _COL_J = tl.constexpr(ROW_BH), tl.constexpr(ROW_I), tl.constexpr(COL_J)
# (BLOCK_M, BLOCK_N, num_warps) per kernel, input precision and padded head dim (<= 64 or 128),
# chosen so that every configuration compiles without register spills (tests/test_triton_aot.py).
# float32 with head dims over 64 spills at any tile size: the op sends it elsewhere (FP32_MAX_HEAD_DIM).
# fp32 dots run as 3xTF32 on tensor cores (float32 accuracy) in smaller tiles; 16-bit inputs as bf16/fp16.
TILES = {
    ("forward", "fp32", 64): (32, 32, 8), ("dkdv", "fp32", 64): (16, 16, 4), ("dq", "fp32", 64): (16, 16, 4),
    ("forward", "16-bit", 64): (64, 64, 8), ("forward", "16-bit", 128): (64, 32, 8),
    ("dkdv", "16-bit", 64): (32, 32, 8), ("dkdv", "16-bit", 128): (32, 32, 8),
    ("dq", "16-bit", 64): (32, 32, 8), ("dq", "16-bit", 128): (32, 32, 8),
}
# With dropout the mask's hash takes registers of its own: smaller tiles where those above would spill.
DROPOUT_TILES = {
    ("forward", "fp32", 64): (32, 16, 4), ("forward", "16-bit", 64): (64, 32, 8), ("dq", "16-bit", 128): (32, 16, 8),
}


MAX_HEAD_DIM = 128
FP32_MAX_HEAD_DIM = 64


def unsupported(q, v):
    """Why these kernels cannot take q [B, H, Lq, D] and v [B, H, Lk, Dv], or None."""
    dim = max(q.shape[3], v.shape[3])
    if dim > MAX_HEAD_DIM:
        return f"triton takes head dims up to {MAX_HEAD_DIM}"
    if q.dtype == torch.float32 and q.device.type == "cuda" and dim > FP32_MAX_HEAD_DIM:
        return f"triton takes float32 head dims up to {FP32_MAX_HEAD_DIM} (bfloat16/float16 up to {MAX_HEAD_DIM})"
    return None


def tiles(kernel, dtype, dim_pad, dropout=False):
    key = (kernel, "fp32" if dtype in (torch.float32, "fp32") else "16-bit", 64 if dim_pad <= 64 else 128)
    return DROPOUT_TILES.get(key, TILES[key]) if dropout else TILES[key]


@triton.jit
def _load_rows(ptr, row0, rows, n_rows, width, dims):
    """Rows row0 + rows of a row-major [., width] tensor, zero outside [0, n_rows) x [0, width).
    The int64 part of the address stays scalar: int32 tile offsets keep register use down."""
    return tl.load(ptr + row0 * width + (rows[:, None] * width + dims[None, :]),
                   mask=(rows[:, None] < n_rows) & (dims[None, :] < width), other=0.0)


@triton.jit
def _score_tile(q, k, bias_ptr, key_bias_ptr, rows, cols, b, h, lq, lk, scale, n_diag):
    """(s [BM, BN] with -inf where masked, diagonal index e, in-bounds mask)."""
    s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * scale
    diag = cols[None, :] - rows[:, None] + lq - 1
    inb = (rows[:, None] < lq) & (cols[None, :] < lk)
    bias = tl.load((bias_ptr + h * n_diag) + diag, mask=inb, other=float("-inf"))
    key_bias = tl.load((key_bias_ptr + b * lk) + cols, mask=cols < lk, other=float("-inf"))
    return s + bias + key_bias[None, :], diag, inb


@triton.jit
def _fmix32(x):
    """MurmurHash3's finaliser on uint32 (multiplies wrap mod 2^32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * _FMIX_1
    x = x ^ (x >> 13)
    x = x * _FMIX_2
    return x ^ (x >> 16)


@triton.jit
def _dropout_rows(seed, bh, rows):
    """The hash's part for query head bh and rows i (uint32 [BM]), shared by a row's key tiles.
    The cast makes the seed uint32 under the interpreter too (it types a Python int by its value)."""
    head = _fmix32(seed.to(tl.uint32) + bh.to(tl.uint32) * _ROW_BH)
    return _fmix32(head + rows.to(tl.uint32) * _ROW_I)


@triton.jit
def _dropout_scale(row_hash, cols, threshold, keep_scale):
    """Z [BM, BN]: keep_scale = 1 / (1 - p) where the hash of (row, j) is >= threshold, else 0."""
    u = _fmix32(row_hash[:, None] + cols.to(tl.uint32)[None, :] * _COL_J)
    return tl.where(u >= threshold.to(tl.uint32), keep_scale, 0.0)


@triton.jit(do_not_specialize=["dropout_seed", "dropout_threshold"])
def attention_forward_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, post_ptr, key_bias_ptr, out_ptr, stat_ptr,
                             heads, group, lq, lk, d, e, scale, normalizer, causal,
                             dropout_seed: tl.uint32, dropout_threshold: tl.uint32, dropout_scale,
                             D: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             HAS_DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    kv_row0 = (b * (heads // group) + h // group) * lk
    n_diag = lq + lk - 1
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    edims = tl.arange(0, E)
    q = _load_rows(q_ptr, bh * lq, rows, lq, d, dims)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    norm = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, E], tl.float32)
    if HAS_DROPOUT:
        row_hash = _dropout_rows(dropout_seed, bh, rows)
    # causal: key j is visible from row i iff j <= i + Lk - Lq
    hi = tl.where(causal != 0, tl.minimum(lk, (pid_m + 1) * BLOCK_M + lk - lq), lk)
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, kv_row0, cols, lk, d, dims)
        s, diag, inb = _score_tile(q, k, bias_ptr, key_bias_ptr, rows, cols, b, h, lq, lk, scale, n_diag)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: exp(-inf) = 0
        p = tl.exp(s - shift[:, None])
        corr = tl.exp(m - shift)
        if normalizer == _L2:
            norm = norm * corr * corr + tl.sum(p * p, axis=1)
        else:
            norm = norm * corr + tl.sum(p, axis=1)
        c = tl.load((post_ptr + h * n_diag) + diag, mask=inb, other=0.0)
        if HAS_DROPOUT:
            c = c * _dropout_scale(row_hash, cols, dropout_threshold, dropout_scale)
        v = _load_rows(v_ptr, kv_row0, cols, lk, e, edims)
        acc = acc * corr[:, None] + tl.dot((p * c).to(v.dtype), v, input_precision="tf32x3")
        m = m_new
    filled = norm > 0.0
    safe = tl.where(filled, norm, 1.0)
    if normalizer == _L2:
        inv = 1.0 / tl.sqrt(safe)
        stat = m + 0.5 * tl.log(safe)
    else:
        inv = 1.0 / safe
        stat = m + tl.log(safe)
    inv = tl.where(filled, inv, 0.0)
    tl.store(out_ptr + bh * lq * e + (rows[:, None] * e + edims[None, :]),
             (acc * inv[:, None]).to(out_ptr.dtype.element_ty), mask=(rows[:, None] < lq) & (edims[None, :] < e))
    tl.store((stat_ptr + bh * lq) + rows, tl.where(filled, stat, float("inf")), mask=rows < lq)


@triton.jit
def _weights(s, stat, row_dot, c, dp, normalizer):
    """(A, dS) for one tile: A = exp(s - stat); dS = A (C dP - D) or A (C dP - A D)."""
    a = tl.exp(s - stat[:, None])
    if normalizer == _L2:
        ds = a * (c * dp - a * row_dot[:, None])
    else:
        ds = a * (c * dp - row_dot[:, None])
    return a, ds


@triton.jit(do_not_specialize=["dropout_seed", "dropout_threshold"])
def attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, post_ptr, key_bias_ptr, stat_ptr, row_dot_ptr, grad_out_ptr,
                          grad_k_ptr, grad_v_ptr, heads, group, lq, lk, d, e, scale, normalizer, causal,
                          dropout_seed: tl.uint32, dropout_threshold: tl.uint32, dropout_scale,
                          D: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    kv_row0 = (b * (heads // group) + h // group) * lk
    n_diag = lq + lk - 1
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    edims = tl.arange(0, E)
    k = _load_rows(k_ptr, kv_row0, cols, lk, d, dims)
    v = _load_rows(v_ptr, kv_row0, cols, lk, e, edims)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, E], tl.float32)
    # causal: rows i < j0 - (Lk - Lq) see no key of this tile
    lo = tl.where(causal != 0, tl.maximum(0, pid_n * BLOCK_N - (lk - lq)) // BLOCK_M * BLOCK_M, 0)
    for i0 in range(lo, lq, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        in_rows = rows < lq
        q = _load_rows(q_ptr, bh * lq, rows, lq, d, dims)
        g = _load_rows(grad_out_ptr, bh * lq, rows, lq, e, edims)
        stat = tl.load((stat_ptr + bh * lq) + rows, mask=in_rows, other=float("inf"))
        row_dot = tl.load((row_dot_ptr + bh * lq) + rows, mask=in_rows, other=0.0)
        s, diag, inb = _score_tile(q, k, bias_ptr, key_bias_ptr, rows, cols, b, h, lq, lk, scale, n_diag)
        c = tl.load((post_ptr + h * n_diag) + diag, mask=inb, other=0.0)
        if HAS_DROPOUT:  # W = C Z takes C's place in dS and dV
            c = c * _dropout_scale(_dropout_rows(dropout_seed, bh, rows), cols, dropout_threshold, dropout_scale)
        dp = tl.dot(g, tl.trans(v), input_precision="tf32x3")
        a, ds = _weights(s, stat, row_dot, c, dp, normalizer)
        dv += tl.dot(tl.trans((a * c).to(g.dtype)), g, input_precision="tf32x3")
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="tf32x3")
    tl.store(grad_k_ptr + bh * lk * d + (cols[:, None] * d + dims[None, :]),
             (dk * scale).to(grad_k_ptr.dtype.element_ty), mask=(cols[:, None] < lk) & (dims[None, :] < d))
    tl.store(grad_v_ptr + bh * lk * e + (cols[:, None] * e + edims[None, :]), dv.to(grad_v_ptr.dtype.element_ty),
             mask=(cols[:, None] < lk) & (edims[None, :] < e))


@triton.jit
def _add_diagonal_sums(tile, scratch_ptr, row_ptr, e_first, n_diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """row[e_first + t] += sum_r tile[r, t - (BLOCK_M - 1) + r] for the BLOCK_M + BLOCK_N - 1
    diagonals t of the tile, in a fixed order: the tile goes through scratch and is read back skewed.
    Needs BLOCK_N <= BLOCK_M (2 BLOCK_M covers the diagonals and is a power of 2)."""
    r = tl.arange(0, BLOCK_M)
    tl.store(scratch_ptr + r[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], tile)
    tl.debug_barrier()
    t = tl.arange(0, 2 * BLOCK_M)
    col = t[None, :] - (BLOCK_M - 1) + r[:, None]
    skewed = tl.load(scratch_ptr + r[:, None] * BLOCK_N + col, mask=(col >= 0) & (col < BLOCK_N), other=0.0)
    sums = tl.sum(skewed, axis=0)
    e = e_first + t
    ok = (t < BLOCK_M + BLOCK_N - 1) & (e >= 0) & (e < n_diag)
    tl.store(row_ptr + e, tl.load(row_ptr + e, mask=ok, other=0.0) + sums, mask=ok)
    tl.debug_barrier()  # the scratch and the row are read again by the next call


@triton.jit(do_not_specialize=["dropout_seed", "dropout_threshold"])
def attention_dq_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, post_ptr, key_bias_ptr, stat_ptr, row_dot_ptr, grad_out_ptr,
                        grad_q_ptr, grad_bias_ptr, grad_post_ptr, scratch_ptr, heads, group, lq, lk, d, e, scale,
                        normalizer, causal, dropout_seed: tl.uint32, dropout_threshold: tl.uint32, dropout_scale,
                        D: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    kv_row0 = (b * (heads // group) + h // group) * lk
    n_diag = lq + lk - 1
    program = bh * tl.num_programs(0) + pid_m
    scratch = scratch_ptr + program * BLOCK_M * BLOCK_N
    grad_bias_row = grad_bias_ptr + program * n_diag
    grad_post_row = grad_post_ptr + program * n_diag
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < lq
    dims = tl.arange(0, D)
    edims = tl.arange(0, E)
    q = _load_rows(q_ptr, bh * lq, rows, lq, d, dims)
    g = _load_rows(grad_out_ptr, bh * lq, rows, lq, e, edims)
    stat = tl.load((stat_ptr + bh * lq) + rows, mask=in_rows, other=float("inf"))
    row_dot = tl.load((row_dot_ptr + bh * lq) + rows, mask=in_rows, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    if HAS_DROPOUT:
        row_hash = _dropout_rows(dropout_seed, bh, rows)
    hi = tl.where(causal != 0, tl.minimum(lk, (pid_m + 1) * BLOCK_M + lk - lq), lk)
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, kv_row0, cols, lk, d, dims)
        v = _load_rows(v_ptr, kv_row0, cols, lk, e, edims)
        s, diag, inb = _score_tile(q, k, bias_ptr, key_bias_ptr, rows, cols, b, h, lq, lk, scale, n_diag)
        c = tl.load((post_ptr + h * n_diag) + diag, mask=inb, other=0.0)
        dp = tl.dot(g, tl.trans(v), input_precision="tf32x3")
        if HAS_DROPOUT:  # C (Z dP) = W dP in dS, and A Z dP is the gradient of C
            dp = dp * _dropout_scale(row_hash, cols, dropout_threshold, dropout_scale)
        a, ds = _weights(s, stat, row_dot, c, dp, normalizer)
        dq += tl.dot(ds.to(k.dtype), k, input_precision="tf32x3")
        e_first = j0 - pid_m * BLOCK_M + lq - 1 - (BLOCK_M - 1)
        _add_diagonal_sums(ds, scratch, grad_bias_row, e_first, n_diag, BLOCK_M, BLOCK_N)
        _add_diagonal_sums(a * dp, scratch, grad_post_row, e_first, n_diag, BLOCK_M, BLOCK_N)
    tl.store(grad_q_ptr + bh * lq * d + (rows[:, None] * d + dims[None, :]),
             (dq * scale).to(grad_q_ptr.dtype.element_ty), mask=in_rows[:, None] & (dims[None, :] < d))


# ---- launch -------------------------------------------------------------------------------------


def _config(kernel, q, v, dropout_p):
    """Constexprs and num_warps: padded head dims and tiles; 16 x 16 tiles under the interpreter
    (it pays per tile)."""
    dim_pad = max(16, triton.next_power_of_2(q.shape[3]))
    value_pad = max(16, triton.next_power_of_2(v.shape[3]))
    block_m, block_n, warps = (16, 16, 1) if q.device.type == "cpu" else \
        tiles(kernel, q.dtype, max(dim_pad, value_pad), dropout_p > 0)
    return dict(D=dim_pad, E=value_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)


def _common(q, k):
    batch, heads, lq, d = q.shape
    return dict(heads=heads, group=heads // k.shape[1], lq=lq, lk=k.shape[2], d=d)


def _dropout(p, seed):
    """The kernels' dropout arguments for probability p in [0, 1) and seed in [0, 2^32)."""
    return dict(dropout_seed=int(seed), dropout_threshold=dropout_threshold(p), dropout_scale=1.0 / (1.0 - p),
                HAS_DROPOUT=p > 0)


def attention_forward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout_p=0.0,
                      dropout_seed=0):
    """As kernels/numba/attention.attention_forward: (out [B, H, Lq, E] in q.dtype, stat [B, H, Lq] fp32)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, lq, _ = q.shape
    config = _config("forward", q, v, dropout_p)
    out = torch.empty(batch, heads, lq, v.shape[3], dtype=q.dtype, device=q.device)
    stat = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
    attention_forward_kernel[(triton.cdiv(lq, config["BLOCK_M"]), batch * heads)](
        q, k, v, bias_diag.float().contiguous(), post_diag.float().contiguous(), key_bias.float().contiguous(),
        out, stat, **_common(q, k), e=v.shape[3], scale=float(scale), normalizer=NORMALIZER_CODES[normalizer],
        causal=int(causal), **_dropout(dropout_p, dropout_seed), **config)
    return out, stat


def attention_backward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, out, stat, grad_out,
                       dropout_p=0.0, dropout_seed=0):
    """As kernels/numba/attention.attention_backward: (dq, dk, dv, d bias_diag, d post_diag)."""
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    batch, heads, lq, d = q.shape
    kv_heads, lk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    bias_diag, post_diag, key_bias = bias_diag.float().contiguous(), post_diag.float().contiguous(), \
        key_bias.float().contiguous()
    row_dot = (grad_out.float() * out.float()).sum(-1).contiguous()  # D_i = rowsum(dO * O)
    common = dict(**_common(q, k), e=dv_dim, scale=float(scale), normalizer=NORMALIZER_CODES[normalizer],
                  causal=int(causal), **_dropout(dropout_p, dropout_seed))
    grad_k = torch.empty(batch, heads, lk, d, dtype=k.dtype if kv_heads == heads else torch.float32, device=q.device)
    grad_v = torch.empty(batch, heads, lk, dv_dim, dtype=grad_k.dtype, device=q.device)
    config = _config("dkdv", q, v, dropout_p)
    attention_dkdv_kernel[(triton.cdiv(lk, config["BLOCK_N"]), batch * heads)](
        q, k, v, bias_diag, post_diag, key_bias, stat, row_dot, grad_out, grad_k, grad_v, **common, **config)
    config = _config("dq", q, v, dropout_p)
    n_qt = triton.cdiv(lq, config["BLOCK_M"])
    grad_q = torch.empty_like(q)
    grad_bias = torch.zeros(batch, heads, n_qt, lq + lk - 1, dtype=torch.float32, device=q.device)
    grad_post = torch.zeros_like(grad_bias)
    scratch = torch.empty(batch * heads * n_qt, config["BLOCK_M"] * config["BLOCK_N"], dtype=torch.float32,
                          device=q.device)
    attention_dq_kernel[(n_qt, batch * heads)](
        q, k, v, bias_diag, post_diag, key_bias, stat, row_dot, grad_out, grad_q, grad_bias, grad_post, scratch,
        **common, **config)
    if kv_heads != heads:  # GQA: each kv head gets the sum over its query heads
        grad_k = grad_k.reshape(batch, kv_heads, heads // kv_heads, lk, d).sum(2).to(k.dtype)
        grad_v = grad_v.reshape(batch, kv_heads, heads // kv_heads, lk, dv_dim).sum(2).to(v.dtype)
    return grad_q, grad_k, grad_v, grad_bias.sum((0, 2)), grad_post.sum((0, 2))


def _aot_configs():
    configs = []
    scalars = {"heads": "i32", "group": "i32", "lq": "i32", "lk": "i32", "d": "i32", "e": "i32", "scale": "fp32",
               "normalizer": "i32", "causal": "i32", "dropout_seed": "u32", "dropout_threshold": "u32",
               "dropout_scale": "fp32", "D": "constexpr", "E": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr", "HAS_DROPOUT": "constexpr"}
    tables = {"bias_ptr": "*fp32", "post_ptr": "*fp32", "key_bias_ptr": "*fp32"}
    for ty in ("fp32", "fp16", "bf16"):
        for dim in (16, 32, 64) if ty == "fp32" else (32, 64, 128):
            inputs = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "v_ptr": f"*{ty}", **tables}
            backward = {**inputs, "stat_ptr": "*fp32", "row_dot_ptr": "*fp32", "grad_out_ptr": f"*{ty}"}
            for name, kernel, signature in (
                    ("forward", attention_forward_kernel, {**inputs, "out_ptr": f"*{ty}", "stat_ptr": "*fp32"}),
                    ("dkdv", attention_dkdv_kernel, {**backward, "grad_k_ptr": f"*{ty}", "grad_v_ptr": f"*{ty}"}),
                    ("dq", attention_dq_kernel, {**backward, "grad_q_ptr": f"*{ty}", "grad_bias_ptr": "*fp32",
                                                 "grad_post_ptr": "*fp32", "scratch_ptr": "*fp32"})):
                for dropout in (False, True):
                    block_m, block_n, warps = tiles(name, ty, dim, dropout)
                    configs.append((kernel, {**signature, **scalars}, {"D": dim, "E": dim, "BLOCK_M": block_m,
                                                                      "BLOCK_N": block_n, "HAS_DROPOUT": dropout},
                                    warps))
    return configs


AOT_CONFIGS = _aot_configs()
