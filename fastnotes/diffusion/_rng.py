"""Seeds for the in-kernel Gaussian noise.

The kernels draw z for element i (flat index over the whole [B, D] batch) from a counter-based
generator: three rounds of a 32-bit integer mixer (lowbias32: xor-shift, multiply, xor-shift,
multiply, xor-shift) keyed by three 32-bit keys, then an inverse normal CDF
z = sqrt(2) erfinv(2u - 1) of u = (k + 1/2) 2^-23 (k = the top 23 bits), so |z| <= 5.3. The same
integer stream is implemented in kernels/numba/diffusion.py, kernels/triton/diffusion.py and
fastnotes/reference/diffusion.py; the backends agree to float32 rounding of erfinv (the fused
kernels use Giles' single-precision erfinv polynomial, the reference torch.erfinv).
"""
import torch

MASK32 = 0xFFFFFFFF


def mix32(v):
    """lowbias32 (a bijection of 32-bit integers with low avalanche bias), on Python ints."""
    v &= MASK32
    v ^= v >> 16
    v = (v * 0x7FEB352D) & MASK32
    v ^= v >> 15
    v = (v * 0x846CA68B) & MASK32
    v ^= v >> 16
    return v


def keys_from_seed(seed):
    """Three 32-bit keys (as signed int32 values, the form the kernels take) from a 64-bit seed."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = mix32((seed & MASK32) ^ 0x9E3779B9)
    k1 = mix32((seed >> 32) ^ k0 ^ 0x85EBCA6B)
    k2 = mix32(k1 + 0xC2B2AE35)
    return tuple(k - (1 << 32) if k >= 1 << 31 else k for k in (k0, k1, k2))


def draw_seed(generator):
    """A fresh 63-bit seed from `generator` (a CPU torch.Generator) or from torch's default CPU
    generator: successive steps get different noise, and torch.manual_seed reproduces them."""
    if generator is not None and generator.device.type != "cpu":
        raise TypeError("sampler_step: generator must be a CPU torch.Generator (it only draws the kernel's "
                        "seed, so the step needs no host-device sync); got one on " + str(generator.device))
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
