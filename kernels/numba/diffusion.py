"""Diffusion sampler step on the CPU: one fused elementwise pass (docs/diffusion.md, 'Stable forms').

Per sample b the caller gives float64 coefficients (A, M, C, px, pm, S) and the kernel computes
    x_s = A x + M m + C clamp(px x + pm m, lo, hi) + S z
over the sample's elements (C is 0 and the clamp is skipped without clipping). z is given, or drawn
here from the counter stream of fastnotes/diffusion/_rng.py: Box-Muller pairs within blocks of
2048 elements of a sample, the uniforms from 32-bit lowbias32 rounds keyed per block. Everything in
the pair loop (32-bit integer hashing, one log, one sqrt, sine and cosine polynomials) vectorises.
Work is split into (sample, block) tiles run in parallel; every tile loop indexes its views from 0.
"""
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._math import JIT_OPTIONS, fast_log, like
from ._tensors import compute_view

BLOCK = 2048  # elements per noise block = parallel tile; must match fastnotes/diffusion/_rng.py
HALF = BLOCK // 2
SERIAL_BELOW = 1 << 16  # elements: below this a parallel launch costs more than it saves
_JIT = dict(JIT_OPTIONS, cache=True)
_F = np.float32
_MASK32 = 0xFFFFFFFF


@intrinsic
def _lowbias32(typingctx, value):
    """lowbias32 of the low 32 bits of an integer, in 32-bit arithmetic (so it vectorises), returned
    zero-extended as int64."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v = args[0]
        v = builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32) if v.type.width < 32 else v
        for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            v = builder.xor(v, builder.lshr(v, ir.Constant(i32, shift)))
            v = builder.mul(v, ir.Constant(i32, multiplier))
        v = builder.xor(v, builder.lshr(v, ir.Constant(i32, 16)))
        return builder.zext(v, ir.IntType(64))

    return types.int64(value), codegen


@njit(inline="always", **_JIT)
def _sin_cos_turns(f):
    """(sin 2 pi f, cos 2 pi f) for float32 f in [0, 1): fold to a quarter turn, then Taylor
    polynomials on [0, pi/2] (error < 1e-7)."""
    y = f - _F(0.5)  # 2 pi f = 2 pi y + pi: both signs flip
    w = abs(y)
    far = w > _F(0.25)
    w = _F(0.5) - w if far else w
    a = w * _F(6.283185307179586)
    a2 = a * a
    s = _F(-2.5052108e-08)
    s = s * a2 + _F(2.7557319e-06)
    s = s * a2 + _F(-1.9841270e-04)
    s = s * a2 + _F(8.3333333e-03)
    s = s * a2 + _F(-1.6666667e-01)
    s = a + a * a2 * s
    c = _F(2.0876757e-09)
    c = c * a2 + _F(-2.7557319e-07)
    c = c * a2 + _F(2.4801587e-05)
    c = c * a2 + _F(-1.3888889e-03)
    c = c * a2 + _F(4.1666667e-02)
    c = c * a2 + _F(-0.5)
    c = _F(1.0) + a2 * c
    s = -s if y > _F(0.0) else s
    c = c if far else -c
    return s, c


@njit(inline="always", **_JIT)
def _pair(p, key1, key2, key3):
    """The Box-Muller pair (r cos, r sin) of pair lane p of a block with keys (key1, key2, key3)."""
    v1 = _lowbias32(_lowbias32(p ^ key1) + key2)
    v2 = _lowbias32(v1 ^ key3)
    u1 = _F(np.int32(v1 >> 9) * np.int32(2) + np.int32(1)) * _F(5.9604644775390625e-08)  # (2k+1) 2^-24
    r = np.sqrt(_F(-2.0) * fast_log(u1))
    s, c = _sin_cos_turns(_F(np.int32(v2 >> 8)) * _F(5.9604644775390625e-08))
    return r * c, r * s


@njit(**_JIT)
def _add_block_noise(cos_half, sin_half, sd, key1, key2, key3):
    """Adds sd z to one block: cos_half gets the r cos of pair lanes 0.., sin_half (no longer) the
    r sin of the same lanes."""
    n_pairs = sin_half.shape[0]
    for p in range(n_pairs):
        zc, zs = _pair(p, key1, key2, key3)
        cos_half[p] += sd * like(cos_half, zc)
        sin_half[p] += sd * like(sin_half, zs)
    tail = cos_half[n_pairs:]  # a short last block: lanes without a sine partner
    for i in range(tail.shape[0]):
        zc, _ = _pair(n_pairs + i, key1, key2, key3)
        tail[i] += sd * like(tail, zc)


@njit(inline="always", **_JIT)
def _block_keys(block, k0, k1, k2):
    """The three 32-bit keys of a global block index (int64) under the seed keys."""
    hi = (block >> 32) * 0x9E3779B9
    key1 = _lowbias32(_lowbias32((block & _MASK32) ^ k0) + (k1 ^ (hi & _MASK32)))
    key2 = _lowbias32(key1 ^ k2)
    return key1, key2, _lowbias32(key2 + k0)


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


def _step_body(x, m, z, coef, clip, lo, hi, generate, k0, k1, k2, out):
    n_rows, n_cols = x.shape
    blocks = (n_cols + BLOCK - 1) // BLOCK
    lo = like(x, lo)
    hi = like(x, hi)
    for tile in prange(n_rows * blocks):
        b = tile // blocks
        j0 = (tile - b * blocks) * BLOCK
        j1 = min(j0 + BLOCK, n_cols)
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
            key1, key2, key3 = _block_keys(np.int64(tile), k0, k1, k2)
            half = min(j0 + HALF, j1)
            _add_block_noise(out[b, j0:half], out[b, half:j1], sd, key1, key2, key3)


_step = njit(parallel=True, **_JIT)(_step_body)
_step_serial = njit(**_JIT)(_step_body)


# ---- launch ----------------------------------------------------------------------------------------


def sampler_step(x, m, z, coef, clip, lo, hi, keys, out):
    """x, m, z (or None) [B, D] contiguous CPU tensors of one dtype; coef float64 [B, 8]; keys
    (k0, k1, k2) int32 values or None (no generated noise); writes out [B, D] (may alias x)."""
    wx = compute_view(x)
    target = out if out.dtype == wx.dtype else torch.empty(wx.shape, dtype=wx.dtype)
    k0, k1, k2 = (k & _MASK32 for k in (keys or (0, 0, 0)))
    step = _step if x.numel() >= SERIAL_BELOW else _step_serial
    step(wx.numpy(), compute_view(m).numpy(), None if z is None else compute_view(z).numpy(), coef.cpu().numpy(),
          bool(clip), float(lo), float(hi), keys is not None, k0, k1, k2, target.numpy())
    if target is not out:
        out.copy_(target)
    return out
