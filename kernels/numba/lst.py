"""Ladder Side-Tuning's gated merge on the CPU (specs/lst.md section 5).

forward:  o = a s + c (h W^T + b). One parallel task per tile of TILE rows: the tile's GEMM goes to
          BLAS (np.dot on contiguous blocks, single-threaded inside a task) and the blend runs on
          the tile while it is in cache; z = h W^T + b is never stored.
backward: ds = a g, and per tile the column sums of g and the sum of g * s (partials, added in a
          fixed order: deterministic). The launcher adds G = g^T h (one BLAS GEMM), from which
          dW = c G, db = c sum(g) and the z-free gate gradient
          dalpha = mu (1 - mu) / T (sum(g s) - <W, G> - <b, sum(g)>).
"""
import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS

TILE = 64
_JIT = dict(JIT_OPTIONS, cache=True)


@njit(parallel=True, **_JIT)
def _forward(s, h, weight_t, bias, a, c, out):
    n = h.shape[0]
    for tile in prange((n + TILE - 1) // TILE):
        lo = tile * TILE
        hi = min(n, lo + TILE)
        z = np.dot(h[lo:hi], weight_t)
        for i in range(hi - lo):
            zi, si, oi = z[i], s[lo + i], out[lo + i]
            for j in range(zi.shape[0]):
                oi[j] = a * si[j] + c * (zi[j] + bias[j])


@njit(parallel=True, **_JIT)
def _backward(g, s, a, grad_s, col_sums, gs_sums):
    n, d = g.shape
    for tile in prange((n + TILE - 1) // TILE):
        lo = tile * TILE
        hi = min(n, lo + TILE)
        cols = col_sums[tile]
        acc = g[0, 0] * 0
        for i in range(lo, hi):
            gi, si, dsi = g[i], s[i], grad_s[i]
            for j in range(d):
                x = gi[j]
                dsi[j] = a * x
                cols[j] += x
                acc += x * si[j]
        gs_sums[tile] = acc


def _dtype(x):
    return np.float32 if x.dtype == torch.float32 else np.float64


def _coefficients(alpha, temperature):
    """(a, c, mu) as Python floats: the gate's (mu, 1 - mu, mu), or (1, 1, None) without a gate."""
    if alpha is None:
        return 1.0, 1.0, None
    mu = float(torch.sigmoid(alpha.detach().double() / temperature))
    return mu, 1.0 - mu, mu


def ladder_merge_forward(s, h, weight, bias, alpha, temperature):
    """s [N, d], h [N, D], weight [d, D], bias [d] contiguous CPU tensors of one dtype (float32 or
    float64); alpha a 0-d tensor or None (ungated). Returns o [N, d]."""
    a, c, _ = _coefficients(alpha, temperature)
    out = torch.empty_like(s)
    if s.shape[0] and s.shape[1]:
        _forward(s.numpy(), h.numpy(), weight.t().contiguous().numpy(), bias.numpy(),
                 _dtype(s)(a), _dtype(s)(c), out.numpy())
    return out


def ladder_merge_backward(g, s, h, weight, bias, alpha, temperature):
    """(ds, dW, db, dalpha) of the merge above for the upstream gradient g [N, d]; dalpha is None
    without a gate."""
    a, c, mu = _coefficients(alpha, temperature)
    n, d = g.shape
    n_tiles = max(1, -(-n // TILE))
    grad_s = torch.empty_like(g)
    col_sums = np.zeros((n_tiles, d), dtype=_dtype(g))
    gs_sums = np.zeros(n_tiles, dtype=_dtype(g))
    if n and d:
        _backward(g.numpy(), s.numpy(), _dtype(g)(a), grad_s.numpy(), col_sums, gs_sums)
    gram = g.t() @ h  # G = g^T h  [d, D]
    sum_g = torch.from_numpy(col_sums.sum(axis=0))
    grad_alpha = None
    if mu is not None:
        # sum(g (s - z)) without z: sum(g z) = <W, G> + <b, sum(g)>
        gate_sum = float(gs_sums.sum()) - float((weight * gram).sum()) - float((bias * sum_g).sum())
        grad_alpha = torch.tensor(mu * (1 - mu) / temperature * gate_sum, dtype=alpha.dtype)
    return grad_s, gram * c, sum_g * c, grad_alpha
