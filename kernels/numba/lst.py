"""Ladder Side-Tuning's gated merge on the CPU (docs/lst.md).

Inputs in float16/bfloat16 are computed in float32 (outputs rounded to the input dtype).
forward:  o = a s + c (h W^T + b). The GEMM runs on torch's threaded BLAS straight into the output
          buffer (BLAS called from inside numba's parallel loops runs single-threaded and warns),
          then one parallel pass blends it in place: no [N, d] intermediate besides the output.
backward: ds = a g, and per tile the column sums of g and the sum of g * s (partials, added in a
          fixed order: deterministic). The launcher adds G = g^T h (one BLAS GEMM), from which
          dW = c G, db = c sum(g) and the z-free gate gradient
          dalpha = mu (1 - mu) / T (sum(g s) - <W, G> - <b, sum(g)>).
"""
import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS
from ._tensors import compute_view

TILE = 64
_JIT = dict(JIT_OPTIONS, cache=True)


def _blend(out, s, bias, a, c):
    """out <- a s + c (out + b) in place, where out holds h W^T."""
    n = out.shape[0]
    for tile in prange((n + TILE - 1) // TILE):
        for i in range(tile * TILE, min(n, (tile + 1) * TILE)):
            oi, si = out[i], s[i]
            for j in range(oi.shape[0]):
                oi[j] = a * si[j] + c * (oi[j] + bias[j])


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


# Two builds of each: threads for big inputs, one thread for small ones, where waking the thread
# pool costs more than the work (milliseconds on a loaded machine).
PARALLEL_MIN_ELEMENTS = 1 << 16
_blend_parallel, _blend_serial = njit(parallel=True, **_JIT)(_blend), njit(**_JIT)(_blend)
_backward_parallel, _backward_serial = njit(parallel=True, **_JIT)(_backward), njit(**_JIT)(_backward)


def _dtype(x):
    return np.float32 if x.dtype == torch.float32 else np.float64


def _coefficients(alpha, temperature):
    """(a, c, mu) as Python floats: the gate's (mu, 1 - mu, mu), or (1, 1, None) without a gate."""
    if alpha is None:
        return 1.0, 1.0, None
    mu = float(torch.sigmoid(alpha.detach().double() / temperature))
    return mu, 1.0 - mu, mu


def ladder_merge_forward(s, h, weight, bias, alpha, temperature):
    """s [N, d], h [N, D], weight [d, D], bias [d] contiguous CPU tensors of one dtype (float16 and
    bfloat16 computed in float32); alpha a 0-d tensor or None (ungated). Returns o [N, d] in s's
    dtype."""
    a, c, _ = _coefficients(alpha, temperature)
    work_s, h, weight, bias = (compute_view(x) for x in (s, h, weight, bias))
    out = h @ weight.t()  # the GEMM on torch's threaded BLAS, straight into the output buffer
    if s.shape[0] and s.shape[1]:
        blend = _blend_parallel if s.numel() >= PARALLEL_MIN_ELEMENTS else _blend_serial
        blend(out.numpy(), work_s.numpy(), bias.numpy(), _dtype(out)(a), _dtype(out)(c))
    return out.to(s.dtype)


def ladder_merge_backward(g, s, h, weight, bias, alpha, temperature):
    """(ds, dW, db, dalpha) of the merge above for the upstream gradient g [N, d], in the inputs'
    dtypes; dalpha is None without a gate."""
    dtype = s.dtype
    g, s, h, weight, bias = (compute_view(x) for x in (g, s, h, weight, bias))
    a, c, mu = _coefficients(alpha, temperature)
    n, d = g.shape
    n_tiles = max(1, -(-n // TILE))
    grad_s = torch.empty_like(g)
    col_sums = np.zeros((n_tiles, d), dtype=_dtype(g))
    gs_sums = np.zeros(n_tiles, dtype=_dtype(g))
    if n and d:
        backward = _backward_parallel if g.numel() >= PARALLEL_MIN_ELEMENTS else _backward_serial
        backward(g.numpy(), s.numpy(), _dtype(g)(a), grad_s.numpy(), col_sums, gs_sums)
    gram = g.t() @ h  # G = g^T h  [d, D]
    sum_g = torch.from_numpy(col_sums.sum(axis=0))
    grad_alpha = None
    if mu is not None:
        # sum(g (s - z)) without z: sum(g z) = <W, G> + <b, sum(g)>
        gate_sum = float(gs_sums.sum()) - float((weight * gram).sum()) - float((bias * sum_g).sum())
        grad_alpha = torch.tensor(mu * (1 - mu) / temperature * gate_sum, dtype=alpha.dtype)
    return grad_s.to(dtype), (gram * c).to(dtype), (sum_g * c).to(dtype), grad_alpha
