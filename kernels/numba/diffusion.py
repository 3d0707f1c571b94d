"""Diffusion sampler step on the CPU: one fused elementwise pass (specs/diffusion.md section 5).

Per sample b the caller gives float64 coefficients (A, M, C, px, pm, S) and the kernel computes
    x_s = A x + M m + C clamp(px x + pm m, lo, hi) + S z
over the sample's elements (C is 0 and the clamp is skipped without clipping). z is given, or drawn
here from the counter stream of fastnotes/diffusion/_rng.py: three lowbias32 rounds keyed by
(k0, k1, k2) on the flat element index, then z = sqrt(2) erfinv(2u - 1) with Giles' single-precision
erfinv (one log, one sqrt, two short polynomials, a select: it vectorises). Work is split into
(sample, chunk) tiles run in parallel; every tile loop indexes its chunk views from 0.
"""
import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS, fast_log, like
from ._tensors import compute_view

CHUNK = 2048
_JIT = dict(JIT_OPTIONS, cache=True)
_U = np.uint64
_M32 = np.uint64(0xFFFFFFFF)
_F = np.float32


@njit(inline="always", **_JIT)
def _mix32(v):
    v = v ^ (v >> _U(16))
    v = (v * _U(0x7FEB352D)) & _M32
    v = v ^ (v >> _U(15))
    v = (v * _U(0x846CA68B)) & _M32
    return v ^ (v >> _U(16))


@njit(inline="always", **_JIT)
def _normal(index, k0, k1, k2):
    """The standard normal number of the counter stream at a flat index (float32)."""
    idx = _U(index)
    v = _mix32((idx & _M32) ^ k0)
    v = _mix32((v + (k1 ^ ((idx >> _U(32)) * _U(0x9E3779B9) & _M32))) & _M32)
    v = _mix32(v ^ k2)
    x = _F(np.int32(v >> _U(9)) * np.int32(2) + np.int32(1)) * _F(1.1920928955078125e-07) - _F(1.0)
    w = -fast_log((_F(1.0) - x) * (_F(1.0) + x))
    # Giles (2010), "Approximating the erfinv function", single precision
    a = w - _F(2.5)
    p = _F(2.81022636e-08)
    p = _F(3.43273939e-07) + p * a
    p = _F(-3.5233877e-06) + p * a
    p = _F(-4.39150654e-06) + p * a
    p = _F(0.00021858087) + p * a
    p = _F(-0.00125372503) + p * a
    p = _F(-0.00417768164) + p * a
    p = _F(0.246640727) + p * a
    p = _F(1.50140941) + p * a
    b = np.sqrt(w) - _F(3.0)
    q = _F(-0.000200214257)
    q = _F(0.000100950558) + q * b
    q = _F(0.00134934322) + q * b
    q = _F(-0.00367342844) + q * b
    q = _F(0.00573950773) + q * b
    q = _F(-0.0076224613) + q * b
    q = _F(0.00943887047) + q * b
    q = _F(1.00167406) + q * b
    q = _F(2.83297682) + q * b
    r = p if w < _F(5.0) else q
    return _F(1.4142135623730951) * r * x


@njit(**_JIT)
def _affine(x, m, out, a, mm):
    for j in range(x.shape[0]):
        out[j] = a * x[j] + mm * m[j]


@njit(**_JIT)
def _affine_clip(x, m, out, a, mm, c, px, pm, lo, hi):
    for j in range(x.shape[0]):
        x0 = px * x[j] + pm * m[j]
        x0 = x0 if x0 > lo else lo
        x0 = x0 if x0 < hi else hi
        out[j] = a * x[j] + mm * m[j] + c * x0


@njit(**_JIT)
def _add_noise(out, z, sd):
    for j in range(out.shape[0]):
        out[j] += sd * z[j]


@njit(**_JIT)
def _add_counter_noise(out, sd, base, k0, k1, k2):
    for j in range(out.shape[0]):
        out[j] += sd * like(out, _normal(base + j, k0, k1, k2))


@njit(parallel=True, **_JIT)
def _step(x, m, z, coef, clip, lo, hi, generate, k0, k1, k2, out):
    n_rows, n_cols = x.shape
    tiles = (n_cols + CHUNK - 1) // CHUNK
    lo = like(x, lo)
    hi = like(x, hi)
    for tile in prange(n_rows * tiles):
        b = tile // tiles
        j0 = (tile - b * tiles) * CHUNK
        j1 = min(j0 + CHUNK, n_cols)
        a = like(x, coef[b, 0])
        mm = like(x, coef[b, 1])
        sd = like(x, coef[b, 5])
        if clip:
            _affine_clip(x[b, j0:j1], m[b, j0:j1], out[b, j0:j1], a, mm, like(x, coef[b, 2]),
                         like(x, coef[b, 3]), like(x, coef[b, 4]), lo, hi)
        else:
            _affine(x[b, j0:j1], m[b, j0:j1], out[b, j0:j1], a, mm)
        if z is not None:
            _add_noise(out[b, j0:j1], z[b, j0:j1], sd)
        elif generate and coef[b, 5] != 0.0:
            _add_counter_noise(out[b, j0:j1], sd, np.int64(b) * n_cols + j0, k0, k1, k2)


# ---- launch ----------------------------------------------------------------------------------------


def sampler_step(x, m, z, coef, clip, lo, hi, keys, out):
    """x, m, z (or None) [B, D] contiguous CPU tensors of one dtype; coef float64 [B, 8]; keys
    (k0, k1, k2) int32 values or None (no generated noise); writes out [B, D] (may alias x)."""
    wx = compute_view(x)
    target = out if out.dtype == wx.dtype else torch.empty(wx.shape, dtype=wx.dtype)
    k0, k1, k2 = (np.uint64(k & 0xFFFFFFFF) for k in (keys or (0, 0, 0)))
    _step(wx.numpy(), compute_view(m).numpy(), None if z is None else compute_view(z).numpy(), coef.cpu().numpy(),
          bool(clip), float(lo), float(hi), keys is not None, k0, k1, k2, target.numpy())
    if target is not out:
        out.copy_(target)
    return out
