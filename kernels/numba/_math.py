"""Shared math for the Numba kernels.

This numba has no SVML, so math.exp inside a loop is a scalar libm call (~2.7 ns per element) and
blocks vectorisation. fast_exp for float32 is a range reduction, a short polynomial and two bit-cast
powers of two: it vectorises to AVX-512 and is accurate to ~1e-7 relative over the whole float32
range, with exp(-inf) = 0, exp(+inf) = inf and NaN passed through. float64 keeps math.exp, because
the float64 path is the accuracy path.
"""
import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# Fast-math flags for our kernels: reassociation lets reductions vectorise. Deliberately without
# 'nnan'/'ninf': masked entries are excluded by selects on values that may be inf or NaN.
FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}

_F = np.float32


@intrinsic
def _bits_as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (an LLVM bitcast)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


def fast_exp(x):
    """exp(x); float32 vectorises (see module docstring), float64 calls libm."""
    raise NotImplementedError("fast_exp is only callable from numba-compiled code")


@overload(fast_exp, fastmath=FASTMATH)
def _fast_exp_impl(x):
    if x == types.float32:

        def impl(x):
            # Clamp so that both half-powers of two below stay normal; outside the clamp the
            # result over/underflows to inf/0 on its own.
            xc = x if x > _F(-104.0) else _F(-104.0)
            xc = xc if xc < _F(89.0) else _F(89.0)
            n = np.floor(xc * _F(1.4426950408889634) + _F(0.5))
            # r = x - n ln2 with ln2 split in two for an exact product with n
            r = xc - n * _F(0.693359375) - n * _F(-2.12194440e-4)
            # Taylor-like minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf coefficients)
            p = _F(1.9875691500e-4)
            p = p * r + _F(1.3981999507e-3)
            p = p * r + _F(8.3334519073e-3)
            p = p * r + _F(4.1665795894e-2)
            p = p * r + _F(1.6666665459e-1)
            p = p * r + _F(5.0000001201e-1)
            y = p * r * r + r + _F(1.0)
            # 2^n as two factors so n in [-150, 129] needs no special cases
            ni = np.int32(n)
            half = ni >> np.int32(1)
            y = y * _bits_as_float32((half + np.int32(127)) << np.int32(23))
            y = y * _bits_as_float32((ni - half + np.int32(127)) << np.int32(23))
            return x if x != x else y

        return impl
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


def like(array, value):
    """`value` converted to the element type of `array` (float32 or float64)."""
    raise NotImplementedError("like is only callable from numba-compiled code")


@overload(like, inline="always")
def _like_impl(array, value):
    if array.dtype == types.float32:
        return lambda array, value: np.float32(value)
    if array.dtype == types.float64:
        return lambda array, value: np.float64(value)
    return None
