"""Seeds for the in-kernel Gaussian noise.

The kernels draw z from a counter-based generator, so any element can be computed on its own and
the result does not depend on how a backend tiles the work. Each sample's D elements are cut into
blocks of 2048; a block's global index (sample * ceil(D / 2048) + block in the sample) is hashed
with the seed keys into three block keys, and lane p < 1024 of the block and lane 1024 + p share
the Box-Muller pair p:
    v1 = h(h(p ^ key1) + key2),  v2 = h(v1 ^ key3)         (h = lowbias32, 32-bit arithmetic)
    u = (2 (v1 >> 9) + 1) 2^-24,  f = (v2 >> 8) 2^-24,  r = sqrt(-2 log u)
    z[p] = r cos(2 pi f),  z[1024 + p] = r sin(2 pi f)        (|z| <= 5.77)
Two normals per log, one sqrt and 1.5 hashes per element: cheaper than an inverse CDF per element.
The same stream is in kernels/numba/diffusion.py, kernels/triton/diffusion.py and
fastnotes/reference/diffusion.py; the backends agree to float32 rounding (the fused kernels use
float32 polynomials for log, sine and cosine, the reference float64 torch functions).
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
