"""GlobalPointer + ZLPR on the GPU, FlashAttention style: the [B, H, n, n] scores never exist.
Math: docs/global_pointer.md; the launcher interface is the numba module's (kernels/numba/global_pointer.py).

rotate:   grid (token tiles, B * Hq). q' = scale R q and k' = R k once, into [B, Hq, n, d] buffers in q's
          dtype (the tiles read them row-contiguous); the same kernel applies scale R^T to dq', dk'.
forward:  grid (row tiles, B * Hq). Each q' k'^T tile serves every type of its q/k head's group (only
          the biases differ); per (type, row tile) a partial (max, sum) of the positive and negative
          streams, started at (0, 0), which the launcher merges with the appended zero in torch
          (deterministic, no atomics).
backward: dq: grid (row tiles, B * Hq): dq' = sum_types dS k', grad_bias_start = row sums of dS;
          dk: grid (column tiles, B * Hq): dk' = sum_types dS^T q', grad_bias_end = column sums.
          Every output element has one writer.
decode:   grid (row tiles, B * Hq), twice: count the hits per (type, row tile), then write their keys
          ((b * H + t) * n + i) * n + j at prefix-sum offsets; the launcher sorts the keys.
Positives: the sorted keys i * n + j of a row tile are a contiguous slice of the (b, t) list (offsets
from torch.searchsorted); a tile's membership mask is a one-hot product, rows x list entries times list
entries x columns, on the tensor cores (exact small integers). The negatives are summed directly over
the allowed non-members, never "all minus positives".
A (type, row tile)'s partial state or bias-gradient slice is read, updated and written back once per
score tile by its one program; a barrier orders those accesses between the program's threads.
Matrix products accumulate in fp32: 3xTF32 for float32 inputs (float32 accuracy), bf16/fp16 otherwise.
"""
import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, num_warps) per kernel, precision and padded head dim (<= 64 or 128), chosen so
# that every configuration compiles without register spills (tests/test_triton_aot.py). float32 head
# dims over 64 spill at any tile size (3xTF32 splits both operands): the op sends them elsewhere.
TILES = {
    ("forward", "fp32", 64): (64, 32, 4), ("dq", "fp32", 64): (16, 32, 2), ("dk", "fp32", 64): (32, 32, 8),
    ("decode", "fp32", 64): (32, 32, 8),
    ("forward", "16-bit", 64): (64, 64, 4), ("forward", "16-bit", 128): (64, 64, 8),
    ("dq", "16-bit", 64): (64, 64, 8), ("dq", "16-bit", 128): (64, 64, 8),
    ("dk", "16-bit", 64): (64, 64, 8), ("dk", "16-bit", 128): (64, 64, 8),
    ("decode", "16-bit", 64): (64, 64, 8), ("decode", "16-bit", 128): (64, 64, 8),
}
ROTATE_BLOCK, ROTATE_WARPS = 16, 8  # tokens per rotate program
INDEX_BLOCK = 16  # positive keys per one-hot product (the smallest tl.dot depth)
MAX_HEAD_DIM = 128
FP32_MAX_HEAD_DIM = 64


def unsupported(q=None):
    """Why these kernels cannot take q [B, n, Hq, d], or None (no q given: nothing to refuse)."""
    if q is None:
        return None
    dim = q.shape[-1]
    if dim > MAX_HEAD_DIM:
        return f"triton takes head sizes up to {MAX_HEAD_DIM}, got {dim}"
    if q.dtype == torch.float32 and q.device.type == "cuda" and dim > FP32_MAX_HEAD_DIM:
        return (f"triton takes float32 head sizes up to {FP32_MAX_HEAD_DIM} "
                f"(bfloat16/float16 up to {MAX_HEAD_DIM})")
    return None


def tiles(kernel, dtype, dim_pad):
    precision = "fp32" if dtype in (torch.float32, "fp32") else "16-bit"
    return TILES[(kernel, precision, 64 if dim_pad <= 64 else 128)]


@triton.jit
def global_pointer_rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, q_heads, n, d, scale,
                                 x_batch_stride, x_token_stride, x_head_stride,
                                 out_batch_stride, out_token_stride, out_head_stride,
                                 ROPE: tl.constexpr, INVERSE: tl.constexpr, D: tl.constexpr,
                                 BLOCK: tl.constexpr):
    """out = scale R x (INVERSE: scale R^T x) for one head's token tile; R rotates the interleaved pairs
    (2m, 2m + 1) by the table angle of the token: (x0 c - x1 s, x1 c + x0 s), its transpose (y0 c + y1 s,
    y1 c - y0 s). Strides in elements let it read and write either layout, [B, n, Hq, d] or [B, Hq, n, d]."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // q_heads
    hq = bh % q_heads
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    ok = (rows[:, None] < n) & (dims[None, :] < d)
    src = x_ptr + (b * x_batch_stride + hq * x_head_stride) + rows[:, None] * x_token_stride
    x = tl.load(src + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    if ROPE:
        partner = tl.load(src + (dims ^ 1)[None, :], mask=ok, other=0.0).to(tl.float32)
        table = rows[:, None] * (d // 2) + (dims // 2)[None, :]
        c = tl.load(cos_ptr + table, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + table, mask=ok, other=0.0).to(tl.float32)
        sign = tl.where(dims % 2 == 0, -1.0, 1.0)
        if INVERSE:
            sign = -sign
        x = x * c + partner * (s * sign[None, :])
    dst = out_ptr + (b * out_batch_stride + hq * out_head_stride) + rows[:, None] * out_token_stride
    tl.store(dst + dims[None, :], (x * scale).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_rows(ptr, row0, rows, n_rows, width, dims):
    """Rows row0 + rows of a row-major [., width] tensor, zero outside [0, n_rows) x [0, width)."""
    return tl.load(ptr + row0 * width + (rows[:, None] * width + dims[None, :]),
                   mask=(rows[:, None] < n_rows) & (dims[None, :] < width), other=0.0)


@triton.jit
def _head_tile(x_ptr, q_heads, n, d, D: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (bh, b, hq): its (batch, q/k head), grid axis 1; the indices of its tile of
    tokens (grid axis 0), the head dims and that tile's rows of x' [B, Hq, n, d]."""
    bh = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    return bh, bh // q_heads, bh % q_heads, tokens, dims, _load_rows(x_ptr, bh * n, tokens, n, d, dims)


@triton.jit
def _first_column(pid_m, tril, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where row tile pid_m's column loop starts: with tril, at the column tile of its diagonal."""
    return tl.where(tril != 0, pid_m * BLOCK_M // BLOCK_N * BLOCK_N, 0)


@triton.jit
def _type_row(b, hq, q_heads, group, g):
    """The (batch, type) row b * H + t of the group's g-th type."""
    return b * q_heads * group + hq * group + g


@triton.jit
def _members(keys_ptr, lo, hi, n, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             INDEX_BLOCK: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: (rows, cols) is one of the keys i * n + j in keys[lo:hi]. Each chunk of
    keys adds onehot(rows == i) @ onehot(j == cols): a count, exact in fp32."""
    count = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for p0 in range(lo, hi, INDEX_BLOCK):
        ps = p0 + tl.arange(0, INDEX_BLOCK)
        listed = ps < hi
        key = tl.load(keys_ptr + ps, mask=listed, other=0)
        key_row = tl.where(listed, key // n, -1)
        key_col = tl.where(listed, key % n, -1)
        by_row = (rows[:, None] == key_row[None, :]).to(tl.float16)
        by_col = (key_col[:, None] == cols[None, :]).to(tl.float16)
        count += tl.dot(by_row, by_col)
    return count > 0.5


@triton.jit
def _type_scores(s0, bias_start_ptr, bias_end_ptr, row_bt, rows, cols, n, pair_ok):
    """(s, allowed) of one type: the shared tile plus its start/end biases (-inf on masked tokens and
    outside [0, n)); allowed: finite and inside the tril band (pair_ok)."""
    start = tl.load(bias_start_ptr + row_bt * n + rows, mask=rows < n, other=float("-inf"))
    end = tl.load(bias_end_ptr + row_bt * n + cols, mask=cols < n, other=float("-inf"))
    s = s0 + start[:, None] + end[None, :]
    return s, pair_ok & (s > float("-inf"))


@triton.jit
def _tile_lse(m, l, x):
    """(m, l) of a running log-sum-exp (sum = l e^m, m starts at 0) with the tile x (-inf: no term)."""
    m_new = tl.maximum(m, tl.max(tl.max(x, axis=1), axis=0))
    return m_new, l * tl.exp(m - m_new) + tl.sum(tl.sum(tl.exp(x - m_new), axis=1), axis=0)


@triton.jit
def _shared_scores(q, k, rows, cols, tril):
    """(q' k'^T, pair_ok) of a tile: the scores every type of the group shares (before its biases) and
    the pairs tril allows."""
    s0 = tl.dot(q, tl.trans(k), input_precision="tf32x3")
    return s0, (rows[:, None] <= cols[None, :]) | (tril == 0)


@triton.jit
def global_pointer_forward_kernel(qr_ptr, kr_ptr, bias_start_ptr, bias_end_ptr, keys_ptr, starts_ptr,
                                  partial_ptr, q_heads, group, n, d, n_keys, n_tiles, tril,
                                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  INDEX_BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, hq, rows, dims, q = _head_tile(qr_ptr, q_heads, n, d, D, BLOCK_M)
    for j0 in range(_first_column(pid_m, tril, BLOCK_M, BLOCK_N), n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s0, pair_ok = _shared_scores(q, _load_rows(kr_ptr, bh * n, cols, n, d, dims), rows, cols, tril)
        for g in range(0, group):
            bt = _type_row(b, hq, q_heads, group, g)
            s, allowed = _type_scores(s0, bias_start_ptr, bias_end_ptr, bt, rows, cols, n, pair_ok)
            state = partial_ptr + (bt * n_tiles + pid_m) * 4
            negatives = tl.where(allowed, s, float("-inf"))
            span = starts_ptr + bt * (n_tiles + 1) + pid_m
            lo = tl.load(span)
            hi = tl.load(span + 1)
            if hi > lo:  # the row tile lists positives: split them off (most tiles skip this)
                member = _members(keys_ptr + bt * n_keys, lo, hi, n, rows, cols, BLOCK_M, BLOCK_N,
                                  INDEX_BLOCK)
                m_pos, l_pos = _tile_lse(tl.load(state), tl.load(state + 1),
                                         tl.where(member, -s, float("-inf")))
                tl.store(state, m_pos)
                tl.store(state + 1, l_pos)
                negatives = tl.where(member, float("-inf"), negatives)
            m_neg, l_neg = _tile_lse(tl.load(state + 2), tl.load(state + 3), negatives)
            tl.store(state + 2, m_neg)
            tl.store(state + 3, l_neg)
        tl.debug_barrier()  # the next tile reads these states back


@triton.jit
def _type_gradient(s0, bias_start_ptr, bias_end_ptr, keys_ptr, starts_ptr, stats_ptr, grad_loss_ptr, bt, tile,
                   rows, cols, n, n_keys, n_tiles, pair_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   INDEX_BLOCK: tl.constexpr):
    """dL/ds of one type on a tile (row tile number `tile`): g e^{s - LN} on the allowed non-members,
    -g e^{-s - LP} on the positives, exactly 0 elsewhere (a select, never inf * 0)."""
    s, allowed = _type_scores(s0, bias_start_ptr, bias_end_ptr, bt, rows, cols, n, pair_ok)
    g = tl.load(grad_loss_ptr + bt)
    ds = tl.where(allowed, g * tl.exp(s - tl.load(stats_ptr + bt * 2 + 1)), 0.0)
    span = starts_ptr + bt * (n_tiles + 1) + tile
    lo = tl.load(span)
    hi = tl.load(span + 1)
    if hi > lo:
        member = _members(keys_ptr + bt * n_keys, lo, hi, n, rows, cols, BLOCK_M, BLOCK_N, INDEX_BLOCK)
        ds = tl.where(member, -g * tl.exp(-s - tl.load(stats_ptr + bt * 2)), ds)
    return ds


@triton.jit
def global_pointer_dq_kernel(qr_ptr, kr_ptr, bias_start_ptr, bias_end_ptr, keys_ptr, starts_ptr, stats_ptr,
                             grad_loss_ptr, grad_qr_ptr, grad_start_ptr, q_heads, group, n, d, n_keys,
                             n_tiles, tril, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             INDEX_BLOCK: tl.constexpr):
    """dq' [B, Hq, n, d] fp32 of one row tile and grad_bias_start (zeroed by the launcher) of its rows."""
    pid_m = tl.program_id(0)
    bh, b, hq, rows, dims, q = _head_tile(qr_ptr, q_heads, n, d, D, BLOCK_M)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for j0 in range(_first_column(pid_m, tril, BLOCK_M, BLOCK_N), n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(kr_ptr, bh * n, cols, n, d, dims)
        s0, pair_ok = _shared_scores(q, k, rows, cols, tril)
        ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for g in range(0, group):
            bt = _type_row(b, hq, q_heads, group, g)
            ds_t = _type_gradient(s0, bias_start_ptr, bias_end_ptr, keys_ptr, starts_ptr, stats_ptr,
                                  grad_loss_ptr, bt, pid_m, rows, cols, n, n_keys, n_tiles, pair_ok,
                                  BLOCK_M, BLOCK_N, INDEX_BLOCK)
            at = grad_start_ptr + bt * n + rows
            tl.store(at, tl.load(at, mask=rows < n, other=0.0) + tl.sum(ds_t, axis=1), mask=rows < n)
            ds += ds_t
        tl.debug_barrier()  # the next tile reads these rows back
        dq += tl.dot(ds.to(k.dtype), k, input_precision="tf32x3")
    tl.store(grad_qr_ptr + bh * n * d + (rows[:, None] * d + dims[None, :]), dq,
             mask=(rows[:, None] < n) & (dims[None, :] < d))


@triton.jit
def global_pointer_dk_kernel(qr_ptr, kr_ptr, bias_start_ptr, bias_end_ptr, keys_ptr, starts_ptr, stats_ptr,
                             grad_loss_ptr, grad_kr_ptr, grad_end_ptr, q_heads, group, n, d, n_keys,
                             n_tiles, tril, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             INDEX_BLOCK: tl.constexpr):
    """dk' [B, Hq, n, d] fp32 of one column tile and grad_bias_end (zeroed by the launcher) of its columns.
    The row tiles (BLOCK_M) are those of `starts`."""
    pid_n = tl.program_id(0)
    bh, b, hq, cols, dims, k = _head_tile(kr_ptr, q_heads, n, d, D, BLOCK_N)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    i_hi = tl.where(tril != 0, tl.minimum(n, (pid_n + 1) * BLOCK_N), n)
    for i0 in range(0, i_hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        q = _load_rows(qr_ptr, bh * n, rows, n, d, dims)
        s0, pair_ok = _shared_scores(q, k, rows, cols, tril)
        ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for g in range(0, group):
            bt = _type_row(b, hq, q_heads, group, g)
            ds_t = _type_gradient(s0, bias_start_ptr, bias_end_ptr, keys_ptr, starts_ptr, stats_ptr,
                                  grad_loss_ptr, bt, i0 // BLOCK_M, rows, cols, n, n_keys, n_tiles, pair_ok,
                                  BLOCK_M, BLOCK_N, INDEX_BLOCK)
            at = grad_end_ptr + bt * n + cols
            tl.store(at, tl.load(at, mask=cols < n, other=0.0) + tl.sum(ds_t, axis=0), mask=cols < n)
            ds += ds_t
        tl.debug_barrier()  # the next tile reads these columns back
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="tf32x3")
    tl.store(grad_kr_ptr + bh * n * d + (cols[:, None] * d + dims[None, :]), dk,
             mask=(cols[:, None] < n) & (dims[None, :] < d))


@triton.jit
def global_pointer_decode_kernel(qr_ptr, kr_ptr, bias_start_ptr, bias_end_ptr, counts_ptr, keys_ptr,
                                 q_heads, group, n, d, n_tiles, tril, threshold,
                                 FILL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
    """FILL False: counts[(b, t), row tile] += its hits (allowed, s > threshold). FILL True: counts holds
    each (type, row tile)'s first slot and advances past the keys ((b * H + t) * n + i) * n + j it writes."""
    pid_m = tl.program_id(0)
    bh, b, hq, rows, dims, q = _head_tile(qr_ptr, q_heads, n, d, D, BLOCK_M)
    for j0 in range(_first_column(pid_m, tril, BLOCK_M, BLOCK_N), n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s0, pair_ok = _shared_scores(q, _load_rows(kr_ptr, bh * n, cols, n, d, dims), rows, cols, tril)
        for g in range(0, group):
            bt = _type_row(b, hq, q_heads, group, g)
            s, allowed = _type_scores(s0, bias_start_ptr, bias_end_ptr, bt, rows, cols, n, pair_ok)
            hit = (allowed & (s > threshold)).to(tl.int32)
            row_hits = tl.sum(hit, axis=1)
            cursor = counts_ptr + bt * n_tiles + pid_m
            first = tl.load(cursor)
            if FILL:
                # slot of each hit: the hits of the earlier rows, then those to its left in its row
                earlier_rows = tl.cumsum(row_hits, axis=0) - row_hits
                slot = first + earlier_rows[:, None] + (tl.cumsum(hit, axis=1) - hit)
                key = (bt * n + rows[:, None]) * n + cols[None, :]
                tl.store(keys_ptr + slot, key, mask=hit != 0)
            tl.store(cursor, first + tl.sum(row_hits, axis=0))
        tl.debug_barrier()  # the next tile reads these cursors back


# ---- launch -------------------------------------------------------------------------------------


INTERPRETER_TILE = 64  # the interpreter pays per tile operation: larger tiles run faster there


def _config(kernel, q):
    """Constexprs and num_warps: the padded head dim and tiles (INTERPRETER_TILE square on CPU)."""
    dim_pad = max(16, triton.next_power_of_2(q.shape[3]))
    block_m, block_n, warps = (INTERPRETER_TILE, INTERPRETER_TILE, 1) if q.device.type == "cpu" else \
        tiles(kernel, q.dtype, dim_pad)
    return dict(D=dim_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)


def _check_head_dim(q):
    reason = unsupported(q)
    if reason:
        raise ValueError(f"global_pointer: {reason}")


def _rotate(x, out, cos, sin, scale, inverse):
    """out = scale R x (inverse: scale R^T x) between the layouts [B, n, Hq, d] and [B, Hq, n, d]."""
    if inverse:  # x [B, Hq, n, d] -> out [B, n, Hq, d]
        batch, q_heads, n, d = x.shape
        x_strides = (x.stride(0), x.stride(2), x.stride(1))
        out_strides = (out.stride(0), out.stride(1), out.stride(2))
    else:  # x [B, n, Hq, d] -> out [B, Hq, n, d]
        batch, n, q_heads, d = x.shape
        x_strides = (x.stride(0), x.stride(1), x.stride(2))
        out_strides = (out.stride(0), out.stride(2), out.stride(1))
    rope = cos is not None
    global_pointer_rotate_kernel[(triton.cdiv(n, ROTATE_BLOCK), batch * q_heads)](
        x, cos if rope else x, sin if rope else x, out, q_heads, n, d, float(scale), *x_strides, *out_strides,
        ROPE=rope, INVERSE=inverse, D=max(16, triton.next_power_of_2(d)), BLOCK=ROTATE_BLOCK,
        num_warps=ROTATE_WARPS)


def _rotated(q, k, rope_cos, rope_sin, scale):
    """(q', k') [B, Hq, n, d] in q's dtype: q' = scale R q, k' = R k."""
    batch, n, q_heads, d = q.shape
    qr = torch.empty(batch, q_heads, n, d, dtype=q.dtype, device=q.device)
    kr = torch.empty_like(qr)
    _rotate(q.contiguous(), qr, rope_cos, rope_sin, scale, False)
    _rotate(k.contiguous(), kr, rope_cos, rope_sin, 1.0, False)
    return qr, kr


def _positive_slices(pos_index, n, block_m):
    """(keys [B * H, P + 1] int64: the sorted positives with the padding and one more entry set to
    n * n, starts [B * H, n_tiles + 1] int32: row tile r's keys are keys[starts[r]:starts[r + 1]])."""
    batch, heads, count = pos_index.shape
    keys = torch.full((batch * heads, count + 1), n * n, dtype=torch.int64, device=pos_index.device)
    keys[:, :count] = torch.where(pos_index < 0, n * n, pos_index).reshape(batch * heads, count)
    n_tiles = triton.cdiv(n, block_m)
    bounds = (torch.arange(n_tiles + 1, device=keys.device) * block_m).clamp(max=n) * n
    starts = torch.searchsorted(keys, bounds.expand(batch * heads, -1).contiguous())
    return keys, starts.to(torch.int32).contiguous(), n_tiles


def _sizes(q, bias_start):
    batch, n, q_heads, d = q.shape
    heads = bias_start.shape[1]
    return dict(q_heads=q_heads, group=heads // q_heads, n=n, d=d)


def _biases(bias_start, bias_end):
    return bias_start.float().contiguous(), bias_end.float().contiguous()


def global_pointer_forward(q, k, rope_cos, rope_sin, scale, bias_start, bias_end, pos_index, tril):
    """As kernels/numba/global_pointer.global_pointer_forward: (loss [B, H], stats [B, H, 2] = (LP, LN))
    in float32."""
    _check_head_dim(q)
    batch, n, q_heads, _ = q.shape
    heads = bias_start.shape[1]
    qr, kr = _rotated(q, k, rope_cos, rope_sin, scale)
    config = _config("forward", q)
    keys, starts, n_tiles = _positive_slices(pos_index, n, config["BLOCK_M"])
    partial = torch.zeros(batch, heads, n_tiles, 4, dtype=torch.float32, device=q.device)
    global_pointer_forward_kernel[(n_tiles, batch * q_heads)](
        qr, kr, *_biases(bias_start, bias_end), keys, starts, partial, **_sizes(q, bias_start),
        n_keys=keys.shape[1], n_tiles=n_tiles, tril=int(tril), INDEX_BLOCK=INDEX_BLOCK, **config)
    # each stream: log(1 + sum over tiles of l e^m), the 1 being the appended zero
    zero = torch.zeros(batch, heads, 1, dtype=torch.float32, device=q.device)
    stats = torch.stack([torch.logsumexp(torch.cat((zero, partial[..., c] + partial[..., c + 1].log()), -1),
                                         -1) for c in (0, 2)], dim=-1)
    return stats.sum(-1), stats


def global_pointer_backward(q, k, rope_cos, rope_sin, scale, bias_start, bias_end, pos_index, tril, stats,
                            grad_loss):
    """As kernels/numba/global_pointer.global_pointer_backward: (grad_q, grad_k [B, n, Hq, d] in q's
    dtype, grad_bias_start, grad_bias_end [B, H, n] float32)."""
    _check_head_dim(q)
    batch, n, q_heads, d = q.shape
    qr, kr = _rotated(q, k, rope_cos, rope_sin, scale)
    bias_start, bias_end = _biases(bias_start, bias_end)
    common = dict(stats_ptr=stats.float().contiguous(), grad_loss_ptr=grad_loss.float().contiguous(),
                  **_sizes(q, bias_start), tril=int(tril), INDEX_BLOCK=INDEX_BLOCK)
    grad_qr = torch.empty(batch, q_heads, n, d, dtype=torch.float32, device=q.device)
    grad_kr = torch.empty_like(grad_qr)
    grad_start = torch.zeros_like(bias_start)
    grad_end = torch.zeros_like(bias_end)
    config = _config("dq", q)
    keys, starts, n_tiles = _positive_slices(pos_index, n, config["BLOCK_M"])
    global_pointer_dq_kernel[(n_tiles, batch * q_heads)](
        qr, kr, bias_start, bias_end, keys, starts, grad_qr_ptr=grad_qr, grad_start_ptr=grad_start,
        n_keys=keys.shape[1], n_tiles=n_tiles, **common, **config)
    config = _config("dk", q)
    keys, starts, n_tiles = _positive_slices(pos_index, n, config["BLOCK_M"])
    global_pointer_dk_kernel[(triton.cdiv(n, config["BLOCK_N"]), batch * q_heads)](
        qr, kr, bias_start, bias_end, keys, starts, grad_kr_ptr=grad_kr, grad_end_ptr=grad_end,
        n_keys=keys.shape[1], n_tiles=n_tiles, **common, **config)
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rotate(grad_qr, grad_q, rope_cos, rope_sin, scale, True)
    _rotate(grad_kr, grad_k, rope_cos, rope_sin, 1.0, True)
    return grad_q, grad_k, grad_start, grad_end


def global_pointer_decode(q, k, rope_cos, rope_sin, scale, bias_start, bias_end, tril, threshold):
    """As kernels/numba/global_pointer.global_pointer_decode: int64 [M, 4] (batch, type, start, end) of
    the allowed pairs with score > threshold (compared in float32), sorted lexicographically."""
    _check_head_dim(q)
    batch, n, q_heads, _ = q.shape
    heads = bias_start.shape[1]
    qr, kr = _rotated(q, k, rope_cos, rope_sin, scale)
    config = _config("decode", q)
    n_tiles = triton.cdiv(n, config["BLOCK_M"])
    counts = torch.zeros(batch * heads * n_tiles, dtype=torch.int64, device=q.device)
    args = (qr, kr, *_biases(bias_start, bias_end))
    sizes = dict(**_sizes(q, bias_start), n_tiles=n_tiles, tril=int(tril), threshold=float(threshold),
                 **config)
    grid = (n_tiles, batch * q_heads)
    global_pointer_decode_kernel[grid](*args, counts, counts, FILL=False, **sizes)
    total = int(counts.sum())
    cursors = (counts.cumsum(0) - counts).contiguous()
    keys = torch.empty(max(total, 1), dtype=torch.int64, device=q.device)
    global_pointer_decode_kernel[grid](*args, cursors, keys, FILL=True, **sizes)
    keys = keys[:total].sort().values
    return torch.stack((keys // (heads * n * n), keys // (n * n) % heads, keys // n % n, keys % n), dim=1)


def _aot_configs():
    configs = []
    sizes = {"q_heads": "i32", "group": "i32", "n": "i32", "d": "i32"}
    blocks = {"D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    for ty in ("fp32", "fp16", "bf16"):
        # the largest head dim of each tile bucket, and 16 for float32 (sm_80's allocator spilled some
        # small float32 tiles); 16 and 32 in every bucket were checked once without spills
        for dim in (16, 64) if ty == "fp32" else (64, 128):
            rotate = {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_heads": "i32", "n": "i32", "d": "i32",
                      "scale": "fp32", **{f"{side}_{what}_stride": "i32" for side in ("x", "out")
                                          for what in ("batch", "token", "head")},
                      "ROPE": "constexpr", "INVERSE": "constexpr", "D": "constexpr", "BLOCK": "constexpr"}
            for inverse in (False, True):
                io = {"x_ptr": "*fp32" if inverse else f"*{ty}", "out_ptr": f"*{ty}"}
                for rope in (True, False) if dim == 64 else (True,):
                    configs.append((global_pointer_rotate_kernel, {**io, **rotate},
                                    {"ROPE": rope, "INVERSE": inverse, "D": dim, "BLOCK": ROTATE_BLOCK},
                                    ROTATE_WARPS))
            inputs = {"qr_ptr": f"*{ty}", "kr_ptr": f"*{ty}", "bias_start_ptr": "*fp32",
                      "bias_end_ptr": "*fp32"}
            positives = {"keys_ptr": "*i64", "starts_ptr": "*i32"}
            scalars = {**sizes, "n_keys": "i32", "n_tiles": "i32", "tril": "i32", **blocks,
                       "INDEX_BLOCK": "constexpr"}
            backward = {**inputs, **positives, "stats_ptr": "*fp32", "grad_loss_ptr": "*fp32"}
            for name, kernel, signature in (
                    ("forward", global_pointer_forward_kernel,
                     {**inputs, **positives, "partial_ptr": "*fp32"}),
                    ("dq", global_pointer_dq_kernel,
                     {**backward, "grad_qr_ptr": "*fp32", "grad_start_ptr": "*fp32"}),
                    ("dk", global_pointer_dk_kernel,
                     {**backward, "grad_kr_ptr": "*fp32", "grad_end_ptr": "*fp32"})):
                block_m, block_n, warps = tiles(name, ty, dim)
                configs.append((kernel, {**signature, **scalars},
                                {"D": dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                 "INDEX_BLOCK": INDEX_BLOCK}, warps))
            block_m, block_n, warps = tiles("decode", ty, dim)
            for fill in (False, True):
                configs.append((global_pointer_decode_kernel,
                                {**inputs, "counts_ptr": "*i64", "keys_ptr": "*i64", **sizes,
                                 "n_tiles": "i32", "tril": "i32", "threshold": "fp32", "FILL": "constexpr",
                                 **blocks},
                                {"FILL": fill, "D": dim, "BLOCK_M": block_m, "BLOCK_N": block_n}, warps))
    return configs


AOT_CONFIGS = _aot_configs()
