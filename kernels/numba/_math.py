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
from numba.extending import intrinsic, overload, register_jitable

# Fast-math flags for our kernels: reassociation lets reductions vectorise. Deliberately without
# 'nnan'/'ninf': masked entries are excluded by selects on values that may be inf or NaN.
FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}
# Every kernel and helper compiles with these: numpy's error model drops the zero-division check
# that Python semantics put on every float division, which would block vectorisation.
JIT_OPTIONS = dict(fastmath=FASTMATH, error_model="numpy", boundscheck=False)

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


@overload(fast_exp, jit_options=JIT_OPTIONS)
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


@intrinsic
def _float32_bits(typingctx, value):
    """The bits of a float32 as an int32 (an LLVM bitcast)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(value), codegen


def fast_log(x):
    """log(x); float32 vectorises (exponent from the bits, Cephes logf polynomial on the mantissa,
    ~1e-7 relative), float64 calls libm. log(0) = -inf, log(inf) = inf, NaN for x < 0 or NaN."""
    raise NotImplementedError("fast_log is only callable from numba-compiled code")


@register_jitable(inline="always", **JIT_OPTIONS)
def _log_of_normal(x, exponent_shift):
    """log(x) for a positive, normal, finite float32 x, minus exponent_shift * log 2."""
    bits = _float32_bits(x)
    e = ((bits >> np.int32(23)) & np.int32(255)) - np.int32(126)
    m = _bits_as_float32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000))  # in [0.5, 1)
    small = m < _F(0.70710678)
    e = e - (np.int32(1) if small else np.int32(0))
    f = (m + m - _F(1.0)) if small else (m - _F(1.0))
    ef = _F(e) - exponent_shift
    z = f * f
    p = _F(7.0376836292e-2)
    p = p * f - _F(1.1514610310e-1)
    p = p * f + _F(1.1676998740e-1)
    p = p * f - _F(1.2420140846e-1)
    p = p * f + _F(1.4249322787e-1)
    p = p * f - _F(1.6668057665e-1)
    p = p * f + _F(2.0000714765e-1)
    p = p * f - _F(2.4999993993e-1)
    p = p * f + _F(3.3333331174e-1)
    y = p * f * z - _F(2.12194440e-4) * ef - _F(0.5) * z
    return f + y + _F(0.693359375) * ef


@overload(fast_log, jit_options=JIT_OPTIONS)
def _fast_log_impl(x):
    if x == types.float32:

        def impl(x):
            # denormals are scaled up first so the exponent field is meaningful
            tiny = x < _F(1.1754944e-38)
            y = _log_of_normal(x * _F(16777216.0) if tiny else x, _F(24.0) if tiny else _F(0.0))
            y = _F(-np.inf) if x == _F(0.0) else y
            y = x if x == _F(np.inf) else y
            return _F(np.nan) if (x < _F(0.0)) | (x != x) else y

        return impl
    if x == types.float64:
        return lambda x: math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)
    return None


# erfcx(z) / t with t = 1 / (1 + z/2), z >= 0: a degree-11 weighted least-squares fit in t on (0, 1]
# (relative error of erfcx 1e-8 in float64 arithmetic, 2e-7 in float32). The same coefficients are
# in kernels/triton/exact.py.
ERFCX_FIT = (2.8209479440e-01, 2.8209396715e-01, 2.4687525697e-01, 1.7547268883e-01, 9.2123984113e-02,
             -5.2596306229e-02, 1.1193219892e-01, -4.1540959662e-01, 4.4426432245e-01, -1.9654373217e-01,
             2.6580492116e-02, 3.1119374997e-03)
_C = tuple(np.float32(c) for c in ERFCX_FIT)
_HALF_LOG_2PI = 0.9189385332046727


def row_max(row):
    """max of a 1-D float array (-inf when empty or all -inf)."""
    raise NotImplementedError("row_max is only callable from numba-compiled code")


@overload(row_max, jit_options=JIT_OPTIONS)
def _row_max_impl(row):
    if row.dtype == types.float32:

        def impl(row):
            # A float max reduction does not vectorise without 'nnan'. The bits of a float32 read
            # as int32 order like the floats once the magnitude bits of negatives are flipped, and
            # an integer max does vectorise (10x faster here); -inf and inf need no special case.
            top = np.int32(-2147483648)
            for c in range(row.shape[0]):
                bits = _float32_bits(row[c])
                key = bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))
                top = key if key > top else top
            return _bits_as_float32(top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF)))

        return impl
    if row.dtype == types.float64:

        def impl(row):
            top = -np.inf
            for c in range(row.shape[0]):
                top = row[c] if row[c] > top else top
            return top

        return impl
    return None


@register_jitable(inline="always", **JIT_OPTIONS)
def _erfc_parts(x):
    """For z = |x|/sqrt 2: t = 1/(1 + z/2), erfcx(z) = t g, e = exp(-z^2); then erfc(z) = t g e."""
    z = abs(x) * _F(0.70710678118654752)
    t = _F(1.0) / (_F(1.0) + _F(0.5) * z)
    g = _C[11]
    g = g * t + _C[10]
    g = g * t + _C[9]
    g = g * t + _C[8]
    g = g * t + _C[7]
    g = g * t + _C[6]
    g = g * t + _C[5]
    g = g * t + _C[4]
    g = g * t + _C[3]
    g = g * t + _C[2]
    g = g * t + _C[1]
    g = g * t + _C[0]
    return t, g, fast_exp(-z * z)


def log_ndtr(x):
    """log Phi(x), the log of the standard normal CDF, stable over the whole range. float32
    vectorises (erfcx fit + fast exp/log); float64 uses libm erfc and, below -20, the asymptotic
    series (relative error < 1e-12)."""
    raise NotImplementedError("log_ndtr is only callable from numba-compiled code")


@overload(log_ndtr, inline="always", jit_options=JIT_OPTIONS)
def _log_ndtr_impl(x):
    if x == types.float32:

        def impl(x):
            t, g, e = _erfc_parts(x)
            u = _F(0.5) * t * g * e  # Phi(-|x|)
            # one logarithm serves both branches:
            # x < 0: log(erfc(z)/2) = log(t g) - z^2 - log 2;  x >= 0: log(1 - erfc(z)/2) = log(1 - u)
            # t g is in (0, 1] (normal for |x| < 1e38) and 1 - u in [0.5, 1]: no special cases needed
            log_arg = _log_of_normal(t * g if x < _F(0.0) else _F(1.0) - u, _F(0.0))
            left = log_arg - _F(0.5) * x * x - _F(0.69314718)
            series = -u * (_F(1.0) + u * (_F(0.5) + u * (_F(0.33333333) + u * _F(0.25))))
            right = series if u < _F(0.01) else log_arg
            return left if x < _F(0.0) else right

        return impl
    if x == types.float64:

        def impl(x):
            if x > 0.0:
                return math.log1p(-0.5 * math.erfc(x * 0.7071067811865476))
            if x > -20.0:
                return math.log(0.5 * math.erfc(-x * 0.7071067811865476))
            x2 = 1.0 / (x * x)
            tail = x2 * (-1.0 + x2 * (3.0 + x2 * (-15.0 + x2 * (105.0 + x2 * (-945.0 + x2 * 10395.0)))))
            return -0.5 * x * x - math.log(-x) - _HALF_LOG_2PI + math.log1p(tail)

        return impl
    return None


def scaled_mills_inverse(x, log_scale):
    """exp(log_scale) * phi(x) / Phi(x), the normal density over the CDF (the backward of log Phi).
    In float32 from the erfcx fit, with one exp and no log: phi(x) = e / sqrt(2 pi) with
    e = exp(-x^2/2), and Phi(x) = t g e / 2 for x < 0 (e cancels), 1 - t g e / 2 for x >= 0."""
    raise NotImplementedError("scaled_mills_inverse is only callable from numba-compiled code")


@overload(scaled_mills_inverse, inline="always", jit_options=JIT_OPTIONS)
def _scaled_mills_inverse_impl(x, log_scale):
    if x == types.float32:

        def impl(x, log_scale):
            t, g, e = _erfc_parts(x)
            scale = fast_exp(log_scale - _F(_HALF_LOG_2PI))
            if_negative = _F(2.0) / (t * g)
            if_positive = e / (_F(1.0) - _F(0.5) * t * g * e)
            return scale * (if_negative if x < _F(0.0) else if_positive)

        return impl
    if x == types.float64:
        return lambda x, log_scale: math.exp(log_scale - 0.5 * x * x - _HALF_LOG_2PI - log_ndtr(x))
    return None
