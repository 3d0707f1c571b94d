"""Diffusion sampler step in plain torch (docs/diffusion.md): the float64 test
oracle and the fallback backend. It works from the schedule table log(alphas_cumprod) directly,
stage by stage (x0_hat and eps_hat, mean, variance, noise), with none of the coefficient folding the
fused kernels use. Nothing here imports the kernels or the public API.
"""
import math

import torch

METHODS = ("ddpm", "ddpm-large", "ddim", "analytic-ddpm", "analytic-ddim", "ode-euler")
PREDICTIONS = ("eps", "x0", "v")
_MASK32 = 0xFFFFFFFF
_BLOCK = 2048  # elements per noise block (the kernels tile by the same blocks)


def step_scalars(logab, t, s, *, method, eta=0.0, gamma=None, cov_max=math.inf, sigma2_max=math.inf):
    """Per-sample float64 quantities [B] for the step t -> s: a dict with a_t, sg_t, a_s, sg_s,
    be_ts, bt_ts, lam2, sigma2, and for ode-euler beta_t (the per-index rate -d log ab / dt).
    `gamma` is a float64 tensor [B] of G_t (analytic methods only). sigma2_max caps sigma2 (the
    Analytic-DPM sampling-time noise clip, docs/diffusion.md)."""
    lt = logab[t]
    ls = logab[s]
    ab_t, ab_s = torch.exp(lt), torch.exp(ls)
    oma_t, oma_s = -torch.expm1(lt), -torch.expm1(ls)
    be = -torch.expm1(lt - ls)
    bt = be * oma_s / oma_t
    out = {"a_t": ab_t.sqrt(), "sg_t": oma_t.sqrt(), "a_s": ab_s.sqrt(), "sg_s": oma_s.sqrt(),
           "be_ts": be, "bt_ts": bt, "ab_t": ab_t, "ab_s": ab_s, "oma_t": oma_t, "oma_s": oma_s,
           "sqrt_al_ts": torch.exp(0.5 * (lt - ls))}
    if method in ("ddpm", "analytic-ddpm"):
        lam2 = bt
    elif method in ("ddim", "analytic-ddim"):
        lam2 = eta * eta * bt
    elif method == "ddpm-large":
        lam2 = be
    else:
        lam2 = torch.zeros_like(bt)
    out["lam2"] = lam2
    if method.startswith("analytic"):
        # sigma*^2 = lam2 + gam^2 clip(Cbar_t, 0, R^2),  Cbar_t = (1 - ab_t)/ab_t (1 - G_t)
        gam = out["a_s"] - torch.sqrt(torch.clamp(oma_s - lam2, min=0) * ab_t / oma_t)
        cov = torch.clamp(oma_t / ab_t * (1 - gamma), min=0, max=cov_max)
        sigma2 = lam2 + gam * gam * cov
    elif method == "ode-euler":
        sigma2 = torch.zeros_like(bt)
        out["beta_t"] = logab[t - 1] - lt
    else:
        sigma2 = lam2.clone()
    sigma2 = torch.clamp(sigma2, max=sigma2_max)
    out["sigma2"] = torch.where(s == 0, torch.zeros_like(sigma2), sigma2)
    return out


def sampler_step(x_t, model_output, t, s, logab, *, method, eta=0.0, prediction="eps", gamma=None,
                 clip_range=None, noise=None, sigma2_max=math.inf):
    """One reverse step x_t -> x_s for a batch [B, ...] in the dtype of x_t.

    t, s: int64 [B] on x_t's device (0 <= s < t <= N); logab: float64 [N + 1] log(alphas_cumprod);
    gamma: float64 [B] G_t values or None; clip_range: None or (lo, hi) for x0_hat;
    noise: a tensor like x_t or None (deterministic: the mean only); sigma2_max: a float cap on
    the variance of that noise.
    Quirk kept from the Analytic-DPM reference code: with clipping, the DDIM-form mean uses the
    clipped x0_hat and the unclipped eps_hat.
    """
    dtype = x_t.dtype
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    cov_max = math.inf if clip_range is None else ((clip_range[1] - clip_range[0]) / 2) ** 2
    sc = step_scalars(logab, t, s, method=method, eta=eta, gamma=gamma, cov_max=cov_max, sigma2_max=sigma2_max)
    c = {k: v.to(dtype).reshape(shape) for k, v in sc.items()}
    x, m = x_t, model_output.to(dtype)
    if prediction == "eps":
        eps = m
        x0 = (x - c["sg_t"] * eps) / c["a_t"]
    elif prediction == "x0":
        x0 = m
        eps = (x - c["a_t"] * x0) / c["sg_t"]
    else:  # v = a_t eps - sg_t x0
        x0 = c["a_t"] * x - c["sg_t"] * m
        eps = c["sg_t"] * x + c["a_t"] * m
    if method == "ode-euler":
        # VP probability-flow ODE, Euler in the timestep index: dx/dt = -1/2 beta(t) (x - eps/sg_t)
        half_dt_beta = 0.5 * c["beta_t"] * (t - s).to(dtype).reshape(shape)
        return x + half_dt_beta * (x - eps / c["sg_t"])
    if clip_range is not None:
        x0 = x0.clamp(clip_range[0], clip_range[1])
    if method in ("ddpm", "ddpm-large", "analytic-ddpm"):
        # DDPM posterior mean: c0 x0_hat + c1 x_t
        c0 = c["a_s"] * c["be_ts"] / c["oma_t"]
        c1 = c["sqrt_al_ts"] * c["oma_s"] / c["oma_t"]
        mean = c0 * x0 + c1 * x
    else:
        k_eps = torch.sqrt(torch.clamp(c["oma_s"] - c["lam2"], min=0))
        mean = c["a_s"] * x0 + k_eps * eps
    if noise is None:
        return mean
    return mean + torch.sqrt(c["sigma2"]) * noise.to(dtype)


def sampler_step_composite(x_t, model_output, t, s, logab, **kwargs):
    """The same step as users write it today (stage by stage, in the input dtype): the benchmark's
    composite contender."""
    return sampler_step(x_t, model_output, t, s, logab, **kwargs)


# ---- the counter-based normal stream (same integers as the fused kernels) ------------------------


def _mul32(v, c):
    """(v * c) mod 2^32 for int64 tensors v in [0, 2^32) without int64 overflow."""
    lo = (v * (c & 0xFFFF)) & _MASK32
    hi = ((v * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(v):
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def _block_keys(block, keys):
    k0, k1, k2 = (k & _MASK32 for k in keys)
    hi = _mul32((block >> 32) & _MASK32, 0x9E3779B9)
    key1 = _mix32((_mix32((block & _MASK32) ^ k0) + (k1 ^ hi)) & _MASK32)
    key2 = _mix32(key1 ^ k2)
    return key1, key2, _mix32((key2 + k0) & _MASK32)


def counter_normal(shape, keys, dtype=torch.float64, device="cpu"):
    """Standard normal noise of `shape` = [B, ...] from the counter stream (fastnotes/diffusion/_rng.py):
    each sample's D elements are cut into blocks of 2048 (global block index b * ceil(D / 2048) + q);
    lane p < 1024 of a block gets r cos(2 pi f) and lane 1024 + p gets r sin(2 pi f) of pair p, with
    r = sqrt(-2 log u), u = (2 (v1 >> 9) + 1) 2^-24, f = (v2 >> 8) 2^-24 from the hashed pair."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    j = torch.arange(cols, dtype=torch.int64, device=device)
    blocks_per_row = -(-cols // _BLOCK)
    block = torch.arange(rows, dtype=torch.int64, device=device)[:, None] * blocks_per_row + (j // _BLOCK)
    lane = j % _BLOCK
    pair = lane % (_BLOCK // 2)
    key1, key2, key3 = _block_keys(block, keys)
    v1 = _mix32((_mix32(pair ^ key1) + key2) & _MASK32)
    v2 = _mix32(v1 ^ key3)
    u = (2 * (v1 >> 9) + 1).to(torch.float64) * 2.0**-24
    angle = (v2 >> 8).to(torch.float64) * (2 * math.pi * 2.0**-24)
    r = torch.sqrt(-2 * torch.log(u))
    z = torch.where(lane < _BLOCK // 2, r * torch.cos(angle), r * torch.sin(angle))
    return z.reshape(shape).to(dtype)
