"""Relative-position attention with post-softmax corrections on the CPU, FlashAttention-2 style.
Math: specs/attention.md sections 5 and 6.

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
import functools
import math

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls scipy's BLAS; load it before limiting it)
import torch
from numba import njit, prange
from threadpoolctl import ThreadpoolController

from ._math import JIT_OPTIONS, fast_exp, fast_log, like
from ._tensors import compute_view

_JIT = dict(JIT_OPTIONS, cache=True)
SOFTMAX, L2 = 0, 1
NORMALIZER_CODES = {"softmax": SOFTMAX, "l2": L2}
# Tile sizes: large enough that the BLAS calls run near peak, small enough that the score tiles
# of both threads stay in L2.
FORWARD_TILES = (64, 256)
BACKWARD_TILES = (64, 128)


@njit(**_JIT)
def _score_tile(s, i0, j0, scale, bias_row, key_bias_row, diag0):
    """s <- scale * s + bias_diag[e] + key_bias[j] in place; returns nothing."""
    for r in range(s.shape[0]):
        e0 = j0 - (i0 + r) + diag0
        row = s[r]
        for c in range(s.shape[1]):
            row[c] = row[c] * scale + bias_row[e0 + c] + key_bias_row[j0 + c]


@njit(parallel=True, **_JIT)
def _forward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, tile_q, tile_k, out, stat):
    batch, heads, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[3]
    group = heads // k.shape[1]
    n_qt = (lq + tile_q - 1) // tile_q
    diag0 = lq - 1
    zero = like(q, 0.0)
    ninf = like(q, -np.inf)
    scale = like(q, scale)
    for task in prange(batch * heads * n_qt):
        b = task // (heads * n_qt)
        h = (task // n_qt) % heads
        i0 = (task % n_qt) * tile_q
        i1 = min(i0 + tile_q, lq)
        hk = h // group
        qt = q[b, h, i0:i1]
        m = np.full(i1 - i0, ninf)
        norm = np.zeros(i1 - i0, q.dtype)
        acc = np.zeros((i1 - i0, dv), q.dtype)
        # causal: key j is visible from row i iff j <= i + Lk - Lq
        j_end = min(lk, i1 + lk - lq) if causal else lk
        for j0 in range(0, j_end, tile_k):
            j1 = min(j0 + tile_k, j_end)
            s = np.dot(qt, k[b, hk, j0:j1].T)
            _score_tile(s, i0, j0, scale, bias_diag[h], key_bias[b], diag0)
            for r in range(i1 - i0):
                row = s[r]
                row_max = ninf
                for c in range(j1 - j0):
                    row_max = max(row_max, row[c])
                m_new = max(m[r], row_max)
                shift = m_new if m_new != ninf else zero  # all masked so far: exp(-inf) = 0 below
                post = post_diag[h, j0 - (i0 + r) + diag0:]
                total = zero
                for c in range(j1 - j0):
                    p = fast_exp(row[c] - shift)
                    total += p * p if normalizer == L2 else p
                    row[c] = p * post[c]
                corr = fast_exp(m[r] - shift)
                norm[r] = norm[r] * (corr * corr if normalizer == L2 else corr) + total
                for e in range(dv):
                    acc[r, e] *= corr
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
            for e in range(dv):
                out[b, h, i0 + r, e] = acc[r, e] * inv


@njit(parallel=True, **_JIT)
def _backward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, tile_q, tile_k, out, stat,
              grad_out, grad_q, grad_k, grad_v, grad_bias_diag, grad_post_diag):
    """grad_k, grad_v are per query head [B, H, Lk, .]; grad_bias_diag, grad_post_diag are per
    (batch, head) [B * H, Lq + Lk - 1]. Every output is written in full."""
    batch, heads, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    group = heads // k.shape[1]
    diag0 = lq - 1
    zero = like(q, 0.0)
    scale = like(q, scale)
    for task in prange(batch * heads):
        b = task // heads
        h = task % heads
        hk = h // group
        # D_i = sum_e dO_ie O_ie: the row term of every variant (spec section 6)
        row_dot = np.empty(lq, q.dtype)
        for i in range(lq):
            acc = zero
            for e in range(dv):
                acc += grad_out[b, h, i, e] * out[b, h, i, e]
            row_dot[i] = acc
        grad_q[b, h] = 0
        grad_bias_diag[task] = 0
        grad_post_diag[task] = 0
        gb = grad_bias_diag[task]
        gp = grad_post_diag[task]
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
                    row_stat = stat[b, h, i0 + r]
                    dot_r = row_dot[i0 + r]
                    a_row = a[r]
                    dp_row = dp[r]
                    post = post_diag[h, e0:]
                    gb_row = gb[e0:]
                    gp_row = gp[e0:]
                    for c in range(j1 - j0):
                        w = fast_exp(a_row[c] - row_stat)
                        g = dp_row[c]
                        gp_row[c] += w * g
                        ds = w * (post[c] * g - (w * dot_r if normalizer == L2 else dot_r))
                        gb_row[c] += ds
                        a_row[c] = w * post[c]   # A * C, for dV
                        dp_row[c] = ds           # dS, for dQ and dK
                dvt += np.dot(a.T, got)
                dk += np.dot(dp.T, qt)
                grad_q[b, h, i0:i1] += np.dot(dp, kt) * scale
            grad_k[b, h, j0:j1] = dk * scale
            grad_v[b, h, j0:j1] = dvt


# ---- launch functions ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _blas_controller():
    return ThreadpoolController()


def _single_threaded_blas():
    """The tile products run inside numba's parallel loop: a threaded BLAS under it would
    oversubscribe the cores (OpenBLAS also warns about the OpenMP loop), so limit it per launch."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _arrays(*tensors):
    return [t.detach().contiguous().numpy() for t in tensors]


def attention_forward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal):
    """q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, E]; bias_diag, post_diag [H, Lq + Lk - 1];
    key_bias [B, Lk]; all in one compute dtype (float32 or float64, or widened from half).
    Returns (out [B, H, Lq, E] in q.dtype, stat [B, H, Lq] in the compute dtype)."""
    work = [compute_view(t) for t in (q, k, v, bias_diag, post_diag, key_bias)]
    batch, heads, lq, _ = q.shape
    out = torch.empty(batch, heads, lq, v.shape[3], dtype=work[0].dtype)
    stat = torch.empty(batch, heads, lq, dtype=work[0].dtype)
    with _single_threaded_blas():
        _forward(*_arrays(*work), float(scale), NORMALIZER_CODES[normalizer], bool(causal), *FORWARD_TILES,
                 out.numpy(), stat.numpy())
    return out.to(q.dtype), stat


def attention_backward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, out, stat, grad_out):
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
    with _single_threaded_blas():
        _backward(*arrays[:6], float(scale), NORMALIZER_CODES[normalizer], bool(causal), *BACKWARD_TILES,
                  *arrays[6:], grad_q.numpy(), grad_k.numpy(), grad_v.numpy(),
                  grad_bias.numpy().reshape(batch * heads, -1), grad_post.numpy().reshape(batch * heads, -1))
    if kv_heads != heads:  # GQA: each kv head gets the sum over its query heads, in head order
        grad_k = grad_k.reshape(batch, kv_heads, heads // kv_heads, lk, d).sum(2)
        grad_v = grad_v.reshape(batch, kv_heads, heads // kv_heads, lk, dv).sum(2)
    return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_bias.sum(0), grad_post.sum(0))
