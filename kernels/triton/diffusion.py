"""Diffusion sampler step on the GPU: one fused elementwise pass (docs/diffusion.md, 'Stable forms').

Grid (samples, tiles of BLOCK elements). Each program loads its sample's float32 coefficients
(A, M, C, px, pm, S) and writes x_s = A x + M m + C clamp(px x + pm m, lo, hi) + S z. NOISE selects
z: 0 none, 1 a given tensor, 2 drawn here from the counter stream of fastnotes/diffusion/_rng.py
(lowbias32 hashing in uint32 arithmetic, Box-Muller pairs; each element computes its own half of
its pair, which costs nothing on a memory-bound GPU kernel), skipped for samples with S = 0.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
NOISE_BLOCK = tl.constexpr(2048)  # elements per noise block, as in fastnotes/diffusion/_rng.py
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
def _counter_normal(row, cols, blocks_per_row, k0, k1, k2):
    """Standard normal float32 numbers of the counter stream at (sample row, int64 columns):
    Box-Muller pairs within blocks of NOISE_BLOCK elements (see fastnotes/diffusion/_rng.py)."""
    block = row * blocks_per_row + cols // NOISE_BLOCK
    lane = cols % NOISE_BLOCK
    pair = (lane % (NOISE_BLOCK // 2)).to(tl.uint32)
    hi = (block >> 32).to(tl.uint32) * 0x9E3779B9
    key1 = _mix32(_mix32((block & 0xFFFFFFFF).to(tl.uint32) ^ k0) + (k1 ^ hi))
    key2 = _mix32(key1 ^ k2)
    key3 = _mix32(key2 + k0)
    v1 = _mix32(_mix32(pair ^ key1) + key2)
    v2 = _mix32(v1 ^ key3)
    u = ((v1 >> 9).to(tl.int32) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
    angle = (v2 >> 8).to(tl.int32).to(tl.float32) * 3.7450702e-07  # 2 pi 2^-24
    r = tl.sqrt(-2.0 * tl.log(u))
    return tl.where(lane < NOISE_BLOCK // 2, r * tl.cos(angle), r * tl.sin(angle))


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
            y += sd * _counter_normal(row, cols, tl.cdiv(n_cols, NOISE_BLOCK), k0.to(tl.uint32, bitcast=True),
                                      k1.to(tl.uint32, bitcast=True), k2.to(tl.uint32, bitcast=True))
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
