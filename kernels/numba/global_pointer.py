"""GlobalPointer + ZLPR on the CPU, FlashAttention style: the [B, H, n, n] scores never exist.
Math: docs/global_pointer.md.

The launchers take q, k [B, n, Hq, d] as the user gave them (Hq = H, or Hq = 1 shared by all H
types: Efficient GlobalPointer), the RoPE tables, and per-type start/end biases [B, H, n] that
carry the token mask as -inf. One task per (batch, q/k head) rotates its q and k once into private
[n, d] buffers (q scaled by 1/sqrt(d) too), then walks tiles of q k^T (BLAS, np.dot); with tril,
tiles wholly below the diagonal are skipped. A shared q/k tile serves every type of its group: only
the biases differ.

Scores s = <q'_i, k'_j> + bias_start[i] + bias_end[j], allowed where finite and (tril) i <= j.
Per (batch, type) row the forward keeps two online log-sum-exps started at (max 0, sum 1), the
appended zero: LP over -s of the positives, LN over s of the other allowed pairs. The negatives are
summed directly, a row's segments between its positive columns, never "all minus positives".
Like the ZLPR kernel, a segment is summed with the running max it already has (no max pass); an
overflow shows as an inf sum and the row is redone exactly (scalar, rare).
Backward: the tiles again, dL/ds = g e^{s - LN} on negatives, -g e^{-s - LP} on positives; the
task's dq, dk accumulate in private buffers and leave through the inverse rotation. Every output
row has one writer: no atomics, deterministic results.
"""
import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS, fast_exp, fast_log, like
from ._tensors import compute_view
from .attention import single_threaded_blas

_JIT = dict(JIT_OPTIONS, cache=True)
TILES = (64, 256)  # rows x columns of a score tile: BLAS near peak, tiles of both threads in L2
_BIG = 2.0**60  # fold a running sum into its max beyond this


@njit(**_JIT)
def _rotate(x, cos, sin, use_rope, scale, out):
    """out [n, d] <- scale * R_i x[i] for x [n, d] (a strided view); R rotates interleaved pairs.
    With -sin for sin it applies R_i^T (the rotation by the opposite angle): the backward's."""
    n, d = out.shape
    for i in range(n):
        src = x[i]
        dst = out[i]
        if use_rope:
            c_row = cos[i]
            s_row = sin[i]
            for m in range(d // 2):
                x0 = src[2 * m]
                x1 = src[2 * m + 1]
                dst[2 * m] = scale * (x0 * c_row[m] - x1 * s_row[m])
                dst[2 * m + 1] = scale * (x1 * c_row[m] + x0 * s_row[m])
        else:
            for e in range(d):
                dst[e] = scale * src[e]


@njit(**_JIT)
def _task_head(q, k, cos, sin, use_rope, scale, task):
    """(b, hq, q', k') of task b * Hq + hq: q' = scale R q and k' = R k [n, d], in the task's own
    buffers."""
    _, n, q_heads, d = q.shape
    b = task // q_heads
    hq = task % q_heads
    qr = np.empty((n, d), q.dtype)
    kr = np.empty((n, d), q.dtype)
    _rotate(q[b, :, hq], cos, sin, use_rope, scale, qr)
    _rotate(k[b, :, hq], cos, sin, use_rope, like(q, 1.0), kr)
    return b, hq, qr, kr


@njit(**_JIT)
def _score_tiles(n, tril, tile_i, tile_j):
    """(i0, i1, j0, j1) of each score tile, row tile after row tile; with tril, the tiles wholly
    below the diagonal are left out."""
    tiles = []
    for i0 in range(0, n, tile_i):
        for j0 in range(i0 if tril else 0, n, tile_j):
            tiles.append((i0, min(i0 + tile_i, n), j0, min(j0 + tile_j, n)))
    return tiles


@njit(**_JIT)
def _segment_sum(row, ends, shift):
    """sum_c exp(row[c] + ends[c] + shift) over a segment (views indexed from 0: vectorises)."""
    total = like(row, 0.0)
    for c in range(row.shape[0]):
        total += fast_exp(row[c] + ends[c] + shift)
    return total


@njit(**_JIT)
def _advance(prow, p, key):
    """From index p on, the first positive key >= key in a sorted, -1-padded list (len if none)."""
    while p < prow.shape[0] and prow[p] >= 0 and prow[p] < key:
        p += 1
    return p


@njit(**_JIT)
def _is_listed(prow, p, key):
    return p < prow.shape[0] and prow[p] >= 0 and prow[p] == key


@njit(**_JIT)
def _lse_add(m, l, x, row):
    """The online log-sum-exp (m, l) with one more term x (exact; positives and the slow path);
    row gives the dtype."""
    if x > m:
        return x, l * fast_exp(m - x) + like(row, 1.0)
    return m, l + fast_exp(x - m)


@njit(**_JIT)
def _row_negatives_exactly(row, start, ends, lo, prow, p, key0, m, l):
    """The slow path of one score row: every allowed non-positive s = row[c] + start + ends[c],
    c in [lo, len), added exactly to (m, l). Positives are the sorted keys prow[p:] (key0 + c)."""
    for c in range(lo, row.shape[0]):
        if _is_listed(prow, p, key0 + c):
            p += 1
            continue
        x = row[c] + start + ends[c]
        if x != -np.inf:
            m, l = _lse_add(m, l, x, row)
    return m, l


@njit(**_JIT)
def _forward_row(row, start, ends, lo, prow, p, key0, m_neg, l_neg, m_pos, l_pos):
    """One score row of one tile into both streams; returns the new (m_neg, l_neg, m_pos, l_pos, p).
    The negatives between positive columns are summed with the running max m_neg; an inf sum (a
    term beyond ~88 above it) redoes the row exactly."""
    w = row.shape[0]
    total = like(row, 0.0)
    p0 = p
    c = lo
    while c < w:
        pc = w
        if p < prow.shape[0] and prow[p] >= 0 and prow[p] < key0 + w:
            pc = prow[p] - key0
        total += _segment_sum(row[c:pc], ends[c:pc], start - m_neg)
        if pc == w:
            break
        m_pos, l_pos = _lse_add(m_pos, l_pos, -(row[pc] + start + ends[pc]), row)
        p += 1
        c = pc + 1
    if total < like(row, np.inf):
        l_neg += total
    else:
        m_neg, l_neg = _row_negatives_exactly(row, start, ends, lo, prow, p0, key0, m_neg, l_neg)
    if l_neg > _BIG:
        m_neg += fast_log(l_neg)
        l_neg = like(row, 1.0)
    return m_neg, l_neg, m_pos, l_pos, p


@njit(parallel=True, **_JIT)
def _forward(q, k, cos, sin, use_rope, scale, bias_start, bias_end, pos, tril, tile_i, tile_j, loss, stats):
    batch, n, q_heads, _ = q.shape
    heads = bias_start.shape[1]
    group = heads // q_heads
    ninf = like(q, -np.inf)
    scale = like(q, scale)
    for task in prange(batch * q_heads):
        b, hq, qr, kr = _task_head(q, k, cos, sin, use_rope, scale, task)
        # per type of the group: (max, sum) of the negative and positive streams
        m_neg = np.zeros(group, q.dtype)
        l_neg = np.ones(group, q.dtype)
        m_pos = np.zeros(group, q.dtype)
        l_pos = np.ones(group, q.dtype)
        for i0, i1, j0, j1 in _score_tiles(n, tril, tile_i, tile_j):
            s = np.dot(qr[i0:i1], kr[j0:j1].T)
            for g in range(group):
                t = hq * group + g
                prow = pos[b, t]
                ends = bias_end[b, t, j0:j1]
                p = 0
                mn, ln, mp, lp = m_neg[g], l_neg[g], m_pos[g], l_pos[g]
                for r in range(i1 - i0):
                    i = i0 + r
                    start = bias_start[b, t, i]
                    lo = max(0, i - j0) if tril else 0
                    if start == ninf or lo >= j1 - j0:
                        continue
                    p = _advance(prow, p, i * n + j0 + lo)
                    mn, ln, mp, lp, p = _forward_row(s[r], start, ends, lo, prow, p, i * n + j0, mn, ln, mp, lp)
                m_neg[g], l_neg[g], m_pos[g], l_pos[g] = mn, ln, mp, lp
        for g in range(group):
            t = hq * group + g
            lse_pos = m_pos[g] + fast_log(l_pos[g])
            lse_neg = m_neg[g] + fast_log(l_neg[g])
            stats[b, t, 0] = lse_pos
            stats[b, t, 1] = lse_neg
            loss[b, t] = lse_pos + lse_neg


@njit(**_JIT)
def _gradient_row(row, shift, ends, lo, scale_g):
    """row <- scale_g * exp(row + ends + shift) for c >= lo, 0 below."""
    for c in range(lo):
        row[c] = like(row, 0.0)
    tail = row[lo:]
    tail_ends = ends[lo:]
    for c in range(tail.shape[0]):
        tail[c] = scale_g * fast_exp(tail[c] + tail_ends[c] + shift)


@njit(**_JIT)
def _row_and_column_sums(row, column_sums):
    """column_sums += row; returns the row's sum (one pass for both bias gradients)."""
    total = like(row, 0.0)
    for c in range(row.shape[0]):
        x = row[c]
        total += x
        column_sums[c] += x
    return total


@njit(**_JIT)
def _add_tile(acc, tile):
    for r in range(acc.shape[0]):
        a = acc[r]
        t = tile[r]
        for c in range(a.shape[0]):
            a[c] += t[c]


@njit(parallel=True, **_JIT)
def _backward(q, k, cos, sin, use_rope, scale, bias_start, bias_end, pos, tril, tile_i, tile_j, stats, grad_loss,
              grad_q, grad_k, grad_start, grad_end):
    """grad_q, grad_k [B, n, Hq, d], grad_start, grad_end [B, H, n]: every entry written."""
    batch, n, q_heads, d = q.shape
    heads = bias_start.shape[1]
    group = heads // q_heads
    zero = like(q, 0.0)
    ninf = like(q, -np.inf)
    scale = like(q, scale)
    inverse_sin = -sin
    for task in prange(batch * q_heads):
        b, hq, qr, kr = _task_head(q, k, cos, sin, use_rope, scale, task)
        dq = np.zeros((n, d), q.dtype)
        dk = np.zeros((n, d), q.dtype)
        for g in range(group):
            grad_start[b, hq * group + g] = zero
            grad_end[b, hq * group + g] = zero
        for i0, i1, j0, j1 in _score_tiles(n, tril, tile_i, tile_j):
            s = np.dot(qr[i0:i1], kr[j0:j1].T)
            work = s if group == 1 else np.empty_like(s)
            ds = s if group == 1 else np.zeros_like(s)
            for g in range(group):
                t = hq * group + g
                if group > 1:
                    work[:] = s
                prow = pos[b, t]
                ends = bias_end[b, t, j0:j1]
                g_t = grad_loss[b, t]
                lse_pos = stats[b, t, 0]
                lse_neg = stats[b, t, 1]
                p = _advance(prow, 0, i0 * n + j0)
                column_sums = np.zeros(j1 - j0, q.dtype)
                for r in range(i1 - i0):
                    i = i0 + r
                    start = bias_start[b, t, i]
                    row = work[r]
                    if start == ninf:
                        row[:] = zero
                        continue
                    lo = min(max(0, i - j0), j1 - j0) if tril else 0
                    _gradient_row(row, start - lse_neg, ends, lo, g_t)
                    # the positives of this row: overwritten with -g e^{-s - LP} before any sum
                    # (their negative-form values may be huge or inf)
                    while p < prow.shape[0] and prow[p] >= 0 and prow[p] < i * n + j1:
                        c = prow[p] - i * n - j0
                        if c >= 0:
                            x = zero
                            for e in range(d):
                                x += qr[i, e] * kr[j0 + c, e]
                            row[c] = -g_t * fast_exp(-(x + start + ends[c]) - lse_pos)
                        p += 1
                    grad_start[b, t, i] += _row_and_column_sums(row, column_sums)
                grad_end[b, t, j0:j1] += column_sums
                if group > 1:
                    _add_tile(ds, work)
            dq[i0:i1] += np.dot(ds, kr[j0:j1])
            dk[j0:j1] += np.dot(ds.T, qr[i0:i1])
        _rotate(dq, cos, inverse_sin, use_rope, scale, grad_q[b, :, hq])
        _rotate(dk, cos, inverse_sin, use_rope, like(q, 1.0), grad_k[b, :, hq])


@njit(parallel=True, **_JIT)
def _decode(q, k, cos, sin, use_rope, scale, bias_start, bias_end, tril, threshold, tile_i, tile_j, offsets, keys,
            fill):
    """fill False: offsets[b * H + t] <- the number of hits of row (b, t). fill True: offsets holds
    each row's first slot; keys[slot] <- ((b * H + t) * n + i) * n + j for each hit."""
    batch, n, q_heads, _ = q.shape
    heads = bias_start.shape[1]
    group = heads // q_heads
    ninf = like(q, -np.inf)
    cut = like(q, threshold)
    scale = like(q, scale)
    for task in prange(batch * q_heads):
        b, hq, qr, kr = _task_head(q, k, cos, sin, use_rope, scale, task)
        counts = np.zeros(group, np.int64)
        for i0, i1, j0, j1 in _score_tiles(n, tril, tile_i, tile_j):
            s = np.dot(qr[i0:i1], kr[j0:j1].T)
            for g in range(group):
                t = hq * group + g
                ends = bias_end[b, t, j0:j1]
                for r in range(i1 - i0):
                    i = i0 + r
                    start = bias_start[b, t, i]
                    if start == ninf:
                        continue
                    lo = max(0, i - j0) if tril else 0
                    row = s[r]
                    if fill:
                        base = ((b * heads + t) * n + i) * n + j0
                        for c in range(lo, j1 - j0):
                            if row[c] + start + ends[c] > cut:
                                keys[offsets[b * heads + t] + counts[g]] = base + c
                                counts[g] += 1
                    else:
                        hits = 0
                        for c in range(lo, j1 - j0):
                            hits += 1 if row[c] + start + ends[c] > cut else 0
                        counts[g] += hits
        if not fill:
            for g in range(group):
                offsets[b * heads + hq * group + g] = counts[g]


# ---- launch functions ---------------------------------------------------------------------------


def _compute_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _common(q, k, rope_cos, rope_sin, bias_start, bias_end):
    """numpy arrays in the compute dtype (float16/bfloat16 widened to float32)."""
    work_q, work_k = compute_view(q).contiguous(), compute_view(k).contiguous()
    dtype = work_q.dtype
    if rope_cos is None:
        rope_cos = rope_sin = torch.zeros(0, 0, dtype=dtype)
    return [t.detach().to(dtype).contiguous().numpy() for t in (work_q, work_k, rope_cos, rope_sin, bias_start,
                                                                 bias_end)]


def global_pointer_forward(q, k, rope_cos, rope_sin, scale, bias_start, bias_end, pos_index, tril):
    """q, k [B, n, Hq, d] (Hq = H or 1); rope_cos, rope_sin [n, d/2] or None (no RoPE); scale the
    factor on <q, k>; bias_start, bias_end [B, H, n] (-inf on masked tokens); pos_index int64
    [B, H, P] of the positives i * n + j, ascending, -1 padding at the end; tril: only i <= j.
    Returns (loss [B, H], stats [B, H, 2] = (LP, LN)) in the compute dtype."""
    arrays = _common(q, k, rope_cos, rope_sin, bias_start, bias_end)
    batch, heads = bias_start.shape[:2]
    loss = torch.empty(batch, heads, dtype=_compute_dtype(q))
    stats = torch.empty(batch, heads, 2, dtype=loss.dtype)
    with single_threaded_blas():
        _forward(*arrays[:4], rope_cos is not None, float(scale), *arrays[4:], pos_index.contiguous().numpy(),
                 bool(tril), *TILES, loss.numpy(), stats.numpy())
    return loss, stats


def global_pointer_backward(q, k, rope_cos, rope_sin, scale, bias_start, bias_end, pos_index, tril, stats,
                            grad_loss):
    """The forward's arguments, its stats and grad_loss [B, H]. Returns (grad_q, grad_k
    [B, n, Hq, d] in q's dtype, grad_bias_start, grad_bias_end [B, H, n] in the compute dtype)."""
    arrays = _common(q, k, rope_cos, rope_sin, bias_start, bias_end)
    dtype = _compute_dtype(q)
    grad_q = torch.empty(q.shape, dtype=dtype)
    grad_k = torch.empty(k.shape, dtype=dtype)
    grad_start = torch.empty(bias_start.shape, dtype=dtype)
    grad_end = torch.empty(bias_end.shape, dtype=dtype)
    with single_threaded_blas():
        _backward(*arrays[:4], rope_cos is not None, float(scale), *arrays[4:], pos_index.contiguous().numpy(),
                  bool(tril), *TILES, stats.to(dtype).contiguous().numpy(),
                  grad_loss.detach().to(dtype).contiguous().numpy(), grad_q.numpy(), grad_k.numpy(),
                  grad_start.numpy(), grad_end.numpy())
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_start, grad_end


def global_pointer_decode(q, k, rope_cos, rope_sin, scale, bias_start, bias_end, tril, threshold):
    """The forward's score arguments and a float threshold. Returns int64 [M, 4] (batch, type,
    start, end) of the allowed pairs with score > threshold, sorted lexicographically."""
    arrays = _common(q, k, rope_cos, rope_sin, bias_start, bias_end)
    batch, heads, n = bias_start.shape
    counts = np.zeros(batch * heads, np.int64)
    args = (*arrays[:4], rope_cos is not None, float(scale), *arrays[4:], bool(tril), float(threshold), *TILES)
    with single_threaded_blas():
        _decode(*args, counts, np.zeros(0, np.int64), False)
        offsets = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        keys = np.empty(int(counts.sum()), np.int64)
        _decode(*args, offsets, keys, True)
    keys = torch.from_numpy(keys).sort().values  # each row's hits are in tile order; rows are in order
    return torch.stack((keys // (heads * n * n), keys // (n * n) % heads, keys // n % n, keys % n), dim=1)
