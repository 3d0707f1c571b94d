"""Relative-position attention with post-softmax corrections on the CPU, FlashAttention-2 style.
Math: docs/attention.md, 'Stable forms' and 'Gradients'.

The launcher hands every relative term over as per-head vectors along the diagonals of the score
matrix, indexed by e = j - i + Lq - 1 (so a row's entries are contiguous in j):
    bias_diag [H, Lq + Lk - 1]   pre-softmax: T5/clip table gather + ALiBi, -inf where causal hides
    post_diag [H, Lq + Lk - 1]   post-softmax factor C (ones without URPE)
    key_bias  [B, Lk]            0, or -inf at padded keys
Scores s = scale <q_i, k_j> + bias_diag[h, e] + key_bias[b, j]. With the row statistic
stat_i = log sum_j exp(s_ij) (softmax) or log sum_j exp(2 s_ij) / 2 (l2), the normalised weight is
a_ij = exp(s_ij - stat_i) for both normalisers; rows with every key masked get stat = +inf, so a = 0.

Forward: one task per (batch, head, query tile), streaming over key tiles with a running max; the
tile products go to BLAS (np.dot) and the elementwise work is vectorised (fast_exp). Only
[query tile, key tile] buffers exist.
Backward: one task per (batch, head), key tiles outer and query tiles inner (the FA2 order):
dK, dV of a key tile accumulate in the task, dQ in the head's own rows, and the diagonal gradients
of bias_diag / post_diag in a private row per task that the launcher sums in a fixed order. No
atomics and no shared writes: results are deterministic.
"""
import contextlib
import functools
import math
import threading

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls scipy's BLAS; load it before limiting it)
import torch
from numba import njit, prange
from threadpoolctl import ThreadpoolController

from .._dropout import COL_J, FMIX_1, FMIX_2, LOW32, ROW_BH, ROW_I, dropout_threshold
from ._math import JIT_OPTIONS, fast_exp, fast_log, like, row_max
from ._tensors import compute_view

_JIT = dict(JIT_OPTIONS, cache=True)
SOFTMAX, L2 = 0, 1
NORMALIZER_CODES = {"softmax": SOFTMAX, "l2": L2}
# Tile sizes: large enough that the BLAS calls run near peak, small enough that the score tiles
# of both threads stay in L2. The forward takes the large tiles (fewer passes over K and V: at
# 4 x 8 x 1024 x 64, T5 bias, one thread, (64, 256) 113 ms, (256, 256) 94-99, (256, 512) 89) when
# they still leave every thread several tasks, else the small ones (see forward_tiles).
FORWARD_TILES = (64, 256)
FORWARD_TILES_LARGE = (256, 512)
FORWARD_TASKS_PER_THREAD = 4
BACKWARD_TILES = (64, 128)
# Forward calls with fewer multiply-adds than this (B * H * Lq * Lk * (D + E); a decode step of a
# t5-small-sized model has ~0.6M) run on the calling thread: tens of microseconds of work, which a
# parallel launch would spend waking the pool.
SERIAL_FORWARD_WORK = 1 << 21


# The elementwise loops below index every array from 0 through views (a negative index would be
# wrapped, and the check blocks vectorisation) and touch at most three arrays each (more would
# exceed LLVM's budget of runtime alias checks and stay scalar).


@njit(**_JIT)
def _score_tile(s, i0, j0, scale, bias_row, key_bias_row, diag0):
    """s <- scale * s + bias_diag[e] + key_bias[j] in place."""
    keys = key_bias_row[j0:]
    for r in range(s.shape[0]):
        bias = bias_row[j0 - (i0 + r) + diag0:]
        row = s[r]
        for c in range(s.shape[1]):
            row[c] = row[c] * scale + (bias[c] + keys[c])


@njit(**_JIT)
def _exp_row(row, shift, post, normalizer):
    """row <- exp(row - shift) * post in place; returns the row's sum of exp (softmax) or of
    exp^2 (l2)."""
    total = like(row, 0.0)
    if normalizer == L2:
        for c in range(row.shape[0]):
            p = fast_exp(row[c] - shift)
            total += p * p
            row[c] = p * post[c]
    else:
        for c in range(row.shape[0]):
            p = fast_exp(row[c] - shift)
            total += p
            row[c] = p * post[c]
    return total


# The hash in uint64 (numba mixes uint64 with int64 into float64, so every constant is a uint64)
_FMIX_1, _FMIX_2, _ROW_BH, _ROW_I, _COL_J, _LOW32, _SHIFT_13, _SHIFT_16 = (
    np.uint64(c) for c in (FMIX_1, FMIX_2, ROW_BH, ROW_I, COL_J, LOW32, 13, 16))


@njit(**_JIT)
def _fmix32(x):
    """MurmurHash3's finaliser on a uint64 holding a 32-bit value (products stay below 2^64)."""
    x ^= x >> _SHIFT_16
    x = (x * _FMIX_1) & _LOW32
    x ^= x >> _SHIFT_13
    x = (x * _FMIX_2) & _LOW32
    return x ^ (x >> _SHIFT_16)


@njit(**_JIT)
def _dropout_row(keep, seed, bh, i, j0, threshold, kept_scale):
    """keep[c] <- kept_scale if dropout keeps weight (i, j0 + c) of query head bh, else 0 (the
    hash of kernels/_dropout.py)."""
    row = _fmix32((seed + np.uint64(bh) * _ROW_BH) & _LOW32)
    row = _fmix32((row + np.uint64(i) * _ROW_I) & _LOW32)
    zero = like(keep, 0.0)
    for c in range(keep.shape[0]):
        u = _fmix32((row + np.uint64(j0 + c) * _COL_J) & _LOW32)
        keep[c] = kept_scale if u >= threshold else zero


@njit(**_JIT)
def _forward_task(task, q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout, tile_q, tile_k,
                  out, stat):
    """One (batch, head, query tile) of the forward: streams over the key tiles, writes its rows.
    dropout: (on, seed, threshold, kept scale, index of this call's first (batch, head) in the whole
    batch, for the hash); the normalisers sum the undropped weights."""
    batch, heads, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[3]
    group = heads // k.shape[1]
    n_qt = (lq + tile_q - 1) // tile_q
    diag0 = lq - 1
    zero = like(q, 0.0)
    ninf = like(q, -np.inf)
    scale = like(q, scale)
    b = task // (heads * n_qt)
    h = (task // n_qt) % heads
    i0 = (task % n_qt) * tile_q
    i1 = min(i0 + tile_q, lq)
    hk = h // group
    qt = q[b, h, i0:i1]
    m = np.full(i1 - i0, ninf)
    norm = np.zeros(i1 - i0, q.dtype)
    acc = np.zeros((i1 - i0, dv), q.dtype)
    dropping, seed, threshold, kept_scale, first_head = dropout
    keep = np.empty(tile_k if dropping else 0, q.dtype)
    kept_scale = like(q, kept_scale)
    # causal: key j is visible from row i iff j <= i + Lk - Lq
    j_end = min(lk, i1 + lk - lq) if causal else lk
    for j0 in range(0, j_end, tile_k):
        j1 = min(j0 + tile_k, j_end)
        s = np.dot(qt, k[b, hk, j0:j1].T)
        _score_tile(s, i0, j0, scale, bias_diag[h], key_bias[b], diag0)
        for r in range(i1 - i0):
            m_new = max(m[r], row_max(s[r]))
            shift = m_new if m_new != ninf else zero  # all masked so far: exp(-inf) = 0 below
            total = _exp_row(s[r], shift, post_diag[h, j0 - (i0 + r) + diag0:], normalizer)
            if dropping:
                row_keep = keep[:j1 - j0]
                _dropout_row(row_keep, seed, first_head + b * heads + h, i0 + r, j0, threshold, kept_scale)
                row = s[r]
                for c in range(j1 - j0):
                    row[c] *= row_keep[c]
            corr = fast_exp(m[r] - shift)
            norm[r] = norm[r] * (corr * corr if normalizer == L2 else corr) + total
            acc_row = acc[r]
            for e in range(dv):
                acc_row[e] *= corr
            m[r] = m_new
        acc += np.dot(s, v[b, hk, j0:j1])
    for r in range(i1 - i0):
        if norm[r] > zero:
            inv = like(q, 1.0) / (norm[r] if normalizer == SOFTMAX else math.sqrt(norm[r]))
            log_norm = fast_log(norm[r])
            stat[b, h, i0 + r] = m[r] + (log_norm if normalizer == SOFTMAX else like(q, 0.5) * log_norm)
        else:  # every key masked: output 0, and a = exp(s - inf) = 0 in the backward
            inv = zero
            stat[b, h, i0 + r] = like(q, np.inf)
        out_row = out[b, h, i0 + r]
        acc_row = acc[r]
        for e in range(dv):
            out_row[e] = acc_row[e] * inv


@njit(parallel=True, **_JIT)
def _forward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout, tile_q, tile_k, out,
             stat):
    tasks = q.shape[0] * q.shape[1] * ((q.shape[2] + tile_q - 1) // tile_q)
    for task in prange(tasks):
        _forward_task(task, q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout, tile_q,
                      tile_k, out, stat)


@njit(**_JIT)
def _forward_serial(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout, tile_q, tile_k, out,
                    stat):
    """The same tasks on the calling thread: for small calls (decoding, Lq = 1), where waking numba's
    thread pool costs more than the work, and stalls whenever a core is busy elsewhere."""
    tasks = q.shape[0] * q.shape[1] * ((q.shape[2] + tile_q - 1) // tile_q)
    for task in range(tasks):
        _forward_task(task, q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout, tile_q,
                      tile_k, out, stat)


@njit(**_JIT)
def _backward_row(a_row, dp_row, row_stat, row_dot, post, grad_bias, grad_post, normalizer, keep):
    """One score row in place: a_row (scores in) <- A * W, dp_row (dO V^T in) <- dS; adds the row's
    A * dP * Z and dS into the diagonal gradients. W = C * Z is what multiplies A in the forward
    (post, the caller folds dropout's factors Z into it); keep holds Z, or nothing without dropout."""
    n = a_row.shape[0]
    for c in range(n):
        a_row[c] = fast_exp(a_row[c] - row_stat)
    if keep.shape[0]:
        for c in range(n):
            grad_post[c] += a_row[c] * dp_row[c] * keep[c]
    else:
        for c in range(n):
            grad_post[c] += a_row[c] * dp_row[c]
    if normalizer == L2:
        for c in range(n):
            dp_row[c] = a_row[c] * (post[c] * dp_row[c] - a_row[c] * row_dot)
    else:
        for c in range(n):
            dp_row[c] = a_row[c] * (post[c] * dp_row[c] - row_dot)
    for c in range(n):
        grad_bias[c] += dp_row[c]
    for c in range(n):
        a_row[c] *= post[c]


@njit(parallel=True, **_JIT)
def _backward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout, tile_q, tile_k, out, stat,
              grad_out, grad_q, grad_k, grad_v, grad_bias_diag, grad_post_diag):
    """grad_k, grad_v are per query head [B, H, Lk, .]; grad_bias_diag, grad_post_diag are per
    (batch, head) [B * H, Lq + Lk - 1]. Every output is written in full."""
    batch, heads, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    group = heads // k.shape[1]
    diag0 = lq - 1
    zero = like(q, 0.0)
    scale = like(q, scale)
    dropping, seed, threshold, kept_scale, _ = dropout
    kept_scale = like(q, kept_scale)
    for task in prange(batch * heads):
        b = task // heads
        h = task % heads
        hk = h // group
        keep = np.empty(tile_k if dropping else 0, q.dtype)
        weight = np.empty(tile_k if dropping else 0, q.dtype)
        # D_i = sum_e dO_ie O_ie: the row term of every variant (spec section 6)
        row_dot = np.empty(lq, q.dtype)
        for i in range(lq):
            o_row = out[b, h, i]
            g_row = grad_out[b, h, i]
            acc = zero
            for e in range(dv):
                acc += g_row[e] * o_row[e]
            row_dot[i] = acc
        grad_q[b, h] = 0
        grad_bias_diag[task] = 0
        grad_post_diag[task] = 0
        for j0 in range(0, lk, tile_k):
            j1 = min(j0 + tile_k, lk)
            kt = k[b, hk, j0:j1]
            vt = v[b, hk, j0:j1]
            dk = np.zeros((j1 - j0, d), q.dtype)
            dvt = np.zeros((j1 - j0, dv), q.dtype)
            # causal: rows i < j0 - (Lk - Lq) see no key of this tile
            i_start = max(0, j0 - (lk - lq)) if causal else 0
            for i0 in range(i_start, lq, tile_q):
                i1 = min(i0 + tile_q, lq)
                qt = q[b, h, i0:i1]
                got = grad_out[b, h, i0:i1]
                a = np.dot(qt, kt.T)
                _score_tile(a, i0, j0, scale, bias_diag[h], key_bias[b], diag0)
                dp = np.dot(got, vt.T)
                for r in range(i1 - i0):
                    e0 = j0 - (i0 + r) + diag0
                    post = post_diag[h, e0:e0 + j1 - j0]
                    row_keep = keep[:j1 - j0]
                    if dropping:
                        _dropout_row(row_keep, seed, task, i0 + r, j0, threshold, kept_scale)
                        post = weight[:j1 - j0]
                        for c in range(j1 - j0):
                            post[c] = post_diag[h, e0 + c] * row_keep[c]
                    _backward_row(a[r], dp[r], stat[b, h, i0 + r], row_dot[i0 + r], post,
                                  grad_bias_diag[task, e0:], grad_post_diag[task, e0:], normalizer, row_keep)
                dvt += np.dot(a.T, got)
                dk += np.dot(dp.T, qt)
                grad_q[b, h, i0:i1] += np.dot(dp, kt) * scale
            grad_k[b, h, j0:j1] = dk * scale
            grad_v[b, h, j0:j1] = dvt


# ---- launch functions ---------------------------------------------------------------------------


_blas_lock = threading.Lock()
_blas_users = 0  # launches running under the limit, in any Python thread
_blas_saved = None  # [(library controller, its thread count before the first launch)]


@contextlib.contextmanager
def single_threaded_blas():
    """The tile products run inside numba's parallel loop: a threaded BLAS under it would
    oversubscribe the cores (OpenBLAS also warns about the OpenMP loop), so BLAS runs on one thread
    while any launch runs. One process-wide limit, counted: the first launch sets it, the last one
    to finish restores the counts (per-call limits nested across threads restored out of order and
    left BLAS at one thread). The BLAS libraries are looked up once and set directly: a
    threadpoolctl limit() per launch cost ~40 us, more than a decode step's kernel."""
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = [(lib, lib.get_num_threads()) for lib in _blas_libraries()]
            for lib, _ in _blas_saved:
                lib.set_num_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, threads in _blas_saved:
                    lib.set_num_threads(threads)
                _blas_saved = None


@functools.lru_cache(maxsize=None)
def _blas_libraries():
    return ThreadpoolController().select(user_api="blas").lib_controllers


def _arrays(*tensors):
    return [t.detach().contiguous().numpy() for t in tensors]


def forward_tiles(batch, heads, lq, threads):
    """(query tile, key tile) of the forward: the large tiles when they give every one of `threads`
    threads at least FORWARD_TASKS_PER_THREAD (batch, head, query tile) tasks, else the small ones
    (a call with few heads or short queries would otherwise leave threads idle)."""
    tasks = batch * heads * -(-lq // FORWARD_TILES_LARGE[0])
    return FORWARD_TILES_LARGE if tasks >= FORWARD_TASKS_PER_THREAD * threads else FORWARD_TILES


# A forward whose q, k, v are not contiguous copies them a batch element at a time when the whole
# copy would exceed this many bytes: the copies are transient, and one element's bound the peak.
CHUNKED_COPY_BYTES = 4 << 20


def _dropout_args(dropout_p, dropout_seed, first_head=0):
    """(on, seed, uint32 threshold, scale of kept weights, first (batch, head) index) as the kernels
    take them."""
    return (dropout_p > 0, np.uint64(dropout_seed), np.uint64(dropout_threshold(dropout_p)),
            1.0 / (1.0 - dropout_p), first_head)


def attention_forward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout_p=0.0,
                      dropout_seed=0):
    """q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, E]; bias_diag, post_diag [H, Lq + Lk - 1];
    key_bias [B, Lk]; all in one compute dtype (float32 or float64, or widened from half).
    Returns (out [B, H, Lq, E] in q.dtype, stat [B, H, Lq] in the compute dtype).

    The kernels read contiguous q, k, v. An attention layer passes views of its projections
    ([B, L, H, D] seen as [B, H, L, D]): those are copied one batch element at a time (a T5 layer
    at B = 4, L = 2048 would otherwise hold 48 MiB of copies), and out then comes back in that
    layout, so that the caller's out.transpose(1, 2).reshape(B, Lq, H * E) is a view, not a copy."""
    work = [compute_view(t) for t in (q, k, v, bias_diag, post_diag, key_bias)]
    batch, heads, lq, _ = q.shape
    dv = v.shape[3]
    if q.transpose(1, 2).is_contiguous() and not q.is_contiguous():  # out follows q's layout
        out = torch.empty(batch, lq, heads, dv, dtype=work[0].dtype).transpose(1, 2)
    else:
        out = torch.empty(batch, heads, lq, dv, dtype=work[0].dtype)
    stat = torch.empty(batch, heads, lq, dtype=work[0].dtype)
    small = batch * heads * lq * k.shape[2] * (q.shape[3] + dv) < SERIAL_FORWARD_WORK
    kernel = _forward_serial if small else _forward
    tiles = forward_tiles(batch, heads, lq, numba.get_num_threads())  # every chunk: the same bits
    copied = sum(t.numel() * t.element_size() for t in work[:3] if not t.is_contiguous())
    chunks = [slice(b, b + 1) for b in range(batch)] if copied > CHUNKED_COPY_BYTES else [slice(0, batch)]
    tables = _arrays(*work[3:5])
    with single_threaded_blas():
        for rows in chunks:
            kernel(*_arrays(*(t[rows] for t in work[:3])), *tables, _arrays(work[5][rows])[0], float(scale),
                   NORMALIZER_CODES[normalizer], bool(causal), _dropout_args(dropout_p, dropout_seed, rows.start * heads),
                   *tiles, out[rows].numpy(), stat[rows].numpy())
    return out.to(q.dtype), stat


def attention_backward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, out, stat, grad_out,
                       dropout_p=0.0, dropout_seed=0):
    """Returns (dq, dk, dv in the input dtypes, d bias_diag [H, Lq + Lk - 1], d post_diag
    [H, Lq + Lk - 1] in the compute dtype)."""
    work = [compute_view(t) for t in (q, k, v, bias_diag, post_diag, key_bias, out, stat, grad_out)]
    dtype = work[0].dtype
    batch, heads, lq, d = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    grad_q = torch.empty(batch, heads, lq, d, dtype=dtype)
    grad_k = torch.empty(batch, heads, lk, d, dtype=dtype)
    grad_v = torch.empty(batch, heads, lk, dv, dtype=dtype)
    grad_bias = torch.empty(batch, heads, lq + lk - 1, dtype=dtype)
    grad_post = torch.empty(batch, heads, lq + lk - 1, dtype=dtype)
    arrays = _arrays(*work)
    with single_threaded_blas():
        _backward(*arrays[:6], float(scale), NORMALIZER_CODES[normalizer], bool(causal),
                  _dropout_args(dropout_p, dropout_seed), *BACKWARD_TILES,
                  *arrays[6:], grad_q.numpy(), grad_k.numpy(), grad_v.numpy(),
                  grad_bias.numpy().reshape(batch * heads, -1), grad_post.numpy().reshape(batch * heads, -1))
    if kv_heads != heads:  # GQA: each kv head gets the sum over its query heads, in head order
        grad_k = grad_k.reshape(batch, kv_heads, heads // kv_heads, lk, d).sum(2)
        grad_v = grad_v.reshape(batch, kv_heads, heads // kv_heads, lk, dv).sum(2)
    return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_bias.sum(0), grad_post.sum(0))
