"""Diffusion sampler step on the GPU: one fused elementwise pass (specs/diffusion.md section 5).

Grid (samples, tiles of BLOCK elements). Each program loads its sample's float32 coefficients
(A, M, C, px, pm, S) and writes x_s = A x + M m + C clamp(px x + pm m, lo, hi) + S z. NOISE selects
z: 0 none, 1 a given tensor, 2 drawn here from the counter stream of fastnotes/diffusion/_rng.py
(three lowbias32 rounds on the flat element index in uint32 arithmetic, then Giles'
single-precision erfinv), skipped for samples with S = 0.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4
N_COEF = 8


@triton.jit
def _mix32(v):
    v = v ^ (v >> 16)
    v = v * 0x7FEB352D
    v = v ^ (v >> 15)
    v = v * 0x846CA68B
    return v ^ (v >> 16)


@triton.jit
def _counter_normal(index, k0, k1, k2):
    """Standard normal float32 numbers at int64 flat indices."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    v = _mix32(lo ^ k0)
    v = _mix32(v + (k1 ^ (hi * 0x9E3779B9)))
    v = _mix32(v ^ k2)
    x = ((v >> 9).to(tl.int32) * 2 + 1).to(tl.float32) * 1.1920928955078125e-07 - 1.0
    w = -tl.log((1.0 - x) * (1.0 + x))
    a = w - 2.5
    p = 2.81022636e-08
    p = 3.43273939e-07 + p * a
    p = -3.5233877e-06 + p * a
    p = -4.39150654e-06 + p * a
    p = 0.00021858087 + p * a
    p = -0.00125372503 + p * a
    p = -0.00417768164 + p * a
    p = 0.246640727 + p * a
    p = 1.50140941 + p * a
    b = tl.sqrt(w) - 3.0
    q = -0.000200214257
    q = 0.000100950558 + q * b
    q = 0.00134934322 + q * b
    q = -0.00367342844 + q * b
    q = 0.00573950773 + q * b
    q = -0.0076224613 + q * b
    q = 0.00943887047 + q * b
    q = 1.00167406 + q * b
    q = 2.83297682 + q * b
    return 1.4142135623730951 * tl.where(w < 5.0, p, q) * x


@triton.jit
def sampler_step_kernel(x_ptr, m_ptr, z_ptr, coef_ptr, out_ptr, n_cols, lo, hi, k0, k1, k2,
                        CLIP: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = cols < n_cols
    offs = row * n_cols + cols
    c = coef_ptr + row * 8
    a = tl.load(c + 0)
    mm = tl.load(c + 1)
    sd = tl.load(c + 5)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    y = a * x + mm * m
    if CLIP:
        x0 = tl.load(c + 3) * x + tl.load(c + 4) * m
        x0 = tl.minimum(tl.maximum(x0, lo), hi)
        y += tl.load(c + 2) * x0
    if NOISE == 1:
        y += sd * tl.load(z_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if NOISE == 2:
        if sd != 0.0:
            y += sd * _counter_normal(offs, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True),
                                      k2.to(tl.uint32, bitcast=True))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inb)


# ---- launch ---------------------------------------------------------------------------------------


def sampler_step(x, m, z, coef, clip, lo, hi, keys, out):
    """x, m, z (or None) [B, D] contiguous tensors of one dtype on one device; coef float64 [B, 8];
    keys (k0, k1, k2) int32 values or None; writes out [B, D] (may alias x)."""
    n_rows, n_cols = x.shape
    if n_cols == 0:
        return out
    noise = 1 if z is not None else (2 if keys is not None else 0)
    k0, k1, k2 = keys or (0, 0, 0)
    sampler_step_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
        x, m, x if z is None else z, coef.to(device=x.device, dtype=torch.float32).contiguous(),
        out, n_cols, float(lo) if clip else 0.0, float(hi) if clip else 0.0, k0, k1, k2,
        CLIP=bool(clip), NOISE=noise, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def _aot_configs():
    configs = []
    for ty in ("fp32", "fp16", "bf16"):
        signature = {"x_ptr": f"*{ty}", "m_ptr": f"*{ty}", "z_ptr": f"*{ty}", "coef_ptr": "*fp32",
                     "out_ptr": f"*{ty}", "n_cols": "i32", "lo": "fp32", "hi": "fp32", "k0": "i32", "k1": "i32",
                     "k2": "i32", "CLIP": "constexpr", "NOISE": "constexpr", "BLOCK": "constexpr"}
        for clip in (False, True):
            for noise in (0, 1, 2):
                configs.append((sampler_step_kernel, signature, {"CLIP": clip, "NOISE": noise, "BLOCK": BLOCK},
                                NUM_WARPS))
    return configs


AOT_CONFIGS = _aot_configs()
