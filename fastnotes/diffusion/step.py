"""The fused batched sampler step (docs/diffusion.md).

Every supported step is affine in (x_t, model_output, z) per sample, apart from the optional clamp
of x0_hat, so the public function computes six per-sample coefficients once, in float64 from the
schedule table (in numpy when the timesteps are host values, else in torch on their device with no
host sync), and hands them to one fused elementwise kernel:

    x0  = clamp(px x + pm m, lo, hi)                      (only when clipping)
    x_s = A x + M m + C x0 + S z                          (C = 0 without clipping)

with z either given or drawn inside the kernel (fastnotes/diffusion/_rng.py). Without clipping the
reconstruction of x0_hat/eps_hat is folded into A and M in float64, so nothing divides by a_t in the
working precision (specs edge cases 3 and 4).
"""
import math
import numbers

import numpy as np
import torch

from .. import _checks, _dispatch, _registry
from ..reference import diffusion as reference
from . import _rng
from .schedule import NoiseSchedule

_OP = "sampler_step"
METHODS = reference.METHODS
PREDICTIONS = reference.PREDICTIONS
DETERMINISTIC = ("ode-euler",)
N_COEF = 8  # A, M, C, px, pm, S, (padding to 32 bytes)


# ---- argument checks ------------------------------------------------------------------------------


def _timesteps(name, value, batch, num_steps):
    """int64 [B]: a range-checked numpy array for ints and CPU tensors (the prologue then runs on the
    host, whatever the device of x_t: a few numpy ops instead of ~40 tiny device kernels), else the
    device tensor as it is (no host sync: out-of-range entries give NaN rows instead)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{_OP}: {name} must be an int or an integer tensor, got bool")
    if isinstance(value, numbers.Integral):
        values = np.full(batch, int(value), dtype=np.int64)
    elif isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{_OP}: {name} must be an integer tensor (timestep indices), got {value.dtype}")
        if value.shape not in ((), (1,), (batch,)):
            raise ValueError(f"{_OP}: {name} must be a scalar or have shape [{batch}] (one timestep per sample), "
                             f"got {tuple(value.shape)}")
        if value.device.type != "cpu":
            return value.reshape(-1).to(torch.int64).expand(batch)
        values = np.broadcast_to(value.reshape(-1).numpy(), (batch,)).astype(np.int64)  # a writable copy
    else:
        raise TypeError(f"{_OP}: {name} must be an int or an int64 tensor, got {type(value).__name__}")
    low = 1 if name == "t" else 0
    bad = (values < low) | (values > num_steps)
    if bad.any():
        raise ValueError(f"{_OP}: {name} must lie in [{low}, {num_steps}] for this schedule; "
                         f"got {int(values[bad][0])}")
    return values


def _check_order(t_idx, s_idx):
    """s < t per sample, checked where it costs no host sync."""
    if isinstance(t_idx, np.ndarray) and isinstance(s_idx, np.ndarray):
        wrong = np.nonzero(s_idx >= t_idx)[0]
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(f"{_OP}: s must be < t (a reverse step); sample {i} has t = {int(t_idx[i])}, "
                             f"s = {int(s_idx[i])}")


def _clip_range(clip_denoised, method):
    if clip_denoised is None:
        return (-1.0, 1.0) if method.startswith("analytic") else None
    if clip_denoised is True:
        return (-1.0, 1.0)
    if clip_denoised is False:
        return None
    try:
        lo, hi = (float(v) for v in clip_denoised)
    except (TypeError, ValueError):
        raise TypeError(f"{_OP}: clip_denoised must be None, a bool or a (low, high) pair, got {clip_denoised!r}") \
            from None
    if not lo < hi:
        raise ValueError(f"{_OP}: clip_denoised range needs low < high, got ({lo}, {hi})")
    return lo, hi


def noise_variance_cap(clip_pixel, method, op=_OP):
    """Analytic-DPM's sampling-time clip (docs/diffusion.md): sigma <= y (2/255) sqrt(pi/2),
    so that E|sigma z| <= 2y/255 = y levels of 8-bit data scaled to [-1, 1]. inf when off."""
    if clip_pixel is None:
        return math.inf
    if isinstance(clip_pixel, bool) or not isinstance(clip_pixel, numbers.Real) or not (
            math.isfinite(clip_pixel) and clip_pixel > 0):
        raise ValueError(f"{op}: clip_pixel must be None or a finite number > 0 (pixel levels), got {clip_pixel!r}")
    if method in ("ode-euler", "heun"):  # heun: sample's second-order ODE method
        raise ValueError(f"{op}: clip_pixel bounds the noise a step adds; {method!r} adds none")
    return (float(clip_pixel) * 2 / 255 * math.sqrt(math.pi / 2)) ** 2


def needs_positive_snr(method, prediction):
    """Whether a step from t divides by a_t = sqrt(ab_t) (so cannot start at a zero-SNR t = N):
    x0_hat from an eps prediction, the analytic covariance (1 - ab_t)/ab_t, the ODE steps."""
    return prediction == "eps" or method.startswith("analytic") or method in ("ode-euler", "heun")


def check_zero_snr(schedule, t_idx, method, prediction, op=_OP):
    """Refuse a step from the zero-SNR timestep N that would divide by a_t = 0 (host timesteps;
    device timesteps get NaN rows from step_coefficients instead)."""
    if (schedule.zero_terminal_snr and isinstance(t_idx, np.ndarray) and needs_positive_snr(method, prediction)
            and bool((t_idx == schedule.num_steps).any())):
        what = "an eps prediction" if prediction == "eps" else f"method {method!r}"
        raise ValueError(f"{op}: the schedule has zero terminal SNR (ab_N = 0, a_N = 0) and {what} cannot step from "
                         f"t = N = {schedule.num_steps} (it divides by a_t); use prediction 'v' or 'x0' with ddpm, "
                         "ddpm-large or ddim there")


def _gamma_table(gamma, schedule, method):
    """G_t for t = 0..N as a float64 numpy array, or None."""
    if not method.startswith("analytic"):
        if gamma is not None:
            raise ValueError(f"{_OP}: gamma is only used by the analytic methods, not {method!r}")
        return None
    if gamma is None:
        raise ValueError(f"{_OP}: method {method!r} needs gamma, the table G_t = E||eps_theta(x_t, t)||^2 / d "
                         "for t = 0..N (see estimate_gamma) or one number for every t")
    n = schedule.num_steps
    if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
        table = np.full(n + 1, float(gamma))
    else:
        table = np.asarray(gamma.detach().cpu() if isinstance(gamma, torch.Tensor) else gamma, dtype=np.float64)
        if table.shape != (n + 1,):
            raise ValueError(f"{_OP}: gamma must be a number or have shape [{n + 1}] (G_t for t = 0..N), "
                             f"got {tuple(table.shape)}")
    if not np.isfinite(table).all() or (table < 0).any():
        raise ValueError(f"{_OP}: gamma must be finite and >= 0 (a mean squared noise prediction)")
    return table


def _check_arguments(x_t, model_output, schedule, method, eta, prediction, noise, out):
    _checks.check_tensor(_OP, "x_t", x_t, _checks.FLOAT_DTYPES)
    _checks.check_tensor(_OP, "model_output", model_output, _checks.FLOAT_DTYPES)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{_OP}: schedule must be a fastnotes.diffusion.NoiseSchedule, got {type(schedule).__name__}")
    if x_t.dim() < 1 or x_t.shape[0] == 0:
        raise ValueError(f"{_OP}: x_t must be [B, ...] with B >= 1, got shape {tuple(x_t.shape)}")
    if model_output.shape != x_t.shape:
        raise ValueError(f"{_OP}: model_output must have the shape of x_t {tuple(x_t.shape)}, "
                         f"got {tuple(model_output.shape)}")
    if method not in METHODS:
        raise ValueError(f"{_OP}: method must be one of {METHODS}, got {method!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{_OP}: prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not (isinstance(eta, numbers.Real) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"{_OP}: eta must be a finite number >= 0, got {eta!r}")
    if eta != 0 and method not in ("ddim", "analytic-ddim"):
        raise ValueError(f"{_OP}: eta is a parameter of ddim and analytic-ddim, not of {method!r}")
    if noise is not None:
        _checks.check_tensor(_OP, "noise", noise, _checks.FLOAT_DTYPES)
        if noise.shape != x_t.shape:
            raise ValueError(f"{_OP}: noise must have the shape of x_t {tuple(x_t.shape)}, got {tuple(noise.shape)}")
    if out is not None:
        _checks.check_tensor(_OP, "out", out, (x_t.dtype,))
        if out.shape != x_t.shape or not out.is_contiguous():
            raise ValueError(f"{_OP}: out must be a contiguous tensor of the shape of x_t {tuple(x_t.shape)}")
    _checks.check_same_device(_OP, "x_t", x_t, model_output=model_output, noise=noise, out=out)
    if out is not None:
        _check_out_aliasing(out, x_t, model_output, noise)


def _memory_span(tensor):
    """[first, end) byte addresses of a tensor's elements (the whole strided extent: conservative
    for a view with gaps), or None when it has no elements."""
    n = tensor.numel()
    if n == 0:
        return None
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + n * tensor.element_size()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()


def _intersect(span_a, span_b):
    return span_a is not None and span_b is not None and span_a[0] < span_b[1] and span_b[0] < span_a[1]


def shares_memory(a, b):
    """Whether two tensors on one device may have elements at the same address."""
    return _intersect(_memory_span(a), _memory_span(b))


def _check_out_aliasing(out, x_t, model_output, noise):
    """out may be x_t itself (each kernel reads an element before writing the same index); any
    other overlap with an input would let a kernel read values it has already overwritten."""
    span = _memory_span(out)
    in_place = span is not None and x_t.is_contiguous() and x_t.data_ptr() == span[0]
    for name, value in (("x_t", x_t), ("model_output", model_output), ("noise", noise)):
        if value is not None and not (name == "x_t" and in_place) and _intersect(span, _memory_span(value)):
            raise ValueError(f"{_OP}: out overlaps {name} in memory; out may be x_t itself (an in-place step) "
                             "but must not share memory with model_output or noise, nor partly with x_t")


# ---- the per-sample prologue ------------------------------------------------------------------------


def step_coefficients(logab, t, s, *, method, eta, prediction, gamma_t, clip_range, sigma2_max=math.inf):
    """float64 [B, 8]: (A, M, C, px, pm, S, 0, 0) with x_s = A x + M m + C clamp(px x + pm m) + S z,
    S^2 = min(sigma2, sigma2_max). Rows with an invalid (t, s) are NaN. Takes numpy arrays (the host
    prologue for CPU tensors: tiny torch ops cost microseconds each) or torch tensors on the device
    (no host sync); the same code serves both."""
    xp = np if isinstance(logab, np.ndarray) else torch
    n = logab.shape[0] - 1
    valid = (t >= 1) & (t <= n) & (s >= 0) & (s < t)
    t = t.clip(1, n)
    s = s.clip(0, n)
    lt, ls = logab[t], logab[s]
    if needs_positive_snr(method, prediction):  # a zero-SNR schedule's t = N (lt = -inf): NaN rows
        valid = valid & (lt > -math.inf)
    ab_t, oma_t, oma_s = xp.exp(lt), -xp.expm1(lt), -xp.expm1(ls)
    a_t, sg_t, a_s = xp.sqrt(ab_t), xp.sqrt(oma_t), xp.exp(0.5 * ls)
    one, zero = xp.ones_like(lt), xp.zeros_like(lt)
    if prediction == "eps":
        px, pm, qx, qm = 1 / a_t, -sg_t / a_t, zero, one
    elif prediction == "x0":
        px, pm, qx, qm = zero, one, 1 / sg_t, -a_t / sg_t
    else:
        px, pm, qx, qm = a_t, -sg_t, sg_t, a_t
    if method == "ode-euler":
        h = 0.5 * (logab[t - 1] - lt) * ((t - s) + zero)
        cx, ce, cx0, sigma2 = 1 + h, -h / sg_t, zero, zero
    else:
        be = -xp.expm1(lt - ls)
        bt = be * oma_s / oma_t
        lam2 = {"ddpm": bt, "analytic-ddpm": bt, "ddpm-large": be}.get(method, eta * eta * bt)
        if method in ("ddpm", "ddpm-large", "analytic-ddpm"):
            cx0, cx, ce = a_s * be / oma_t, xp.exp(0.5 * (lt - ls)) * oma_s / oma_t, zero
        else:
            cx0, cx, ce = a_s, zero, xp.sqrt((oma_s - lam2).clip(min=0))
        if method.startswith("analytic"):
            r2 = math.inf if clip_range is None else ((clip_range[1] - clip_range[0]) / 2) ** 2
            gam = a_s - xp.sqrt((oma_s - lam2).clip(min=0) * ab_t / oma_t)
            cov = (xp.expm1(-lt) * (1 - gamma_t)).clip(min=0, max=r2)
            sigma2 = lam2 + gam * gam * cov
        else:
            sigma2 = lam2
        sigma2 = xp.where(s == 0, zero, sigma2.clip(max=sigma2_max))
    if clip_range is not None and method != "ode-euler":
        a, m, c = cx + ce * qx, ce * qm, cx0
    else:
        a, m, c = cx + cx0 * px + ce * qx, cx0 * pm + ce * qm, zero
    coef = xp.stack([a, m, c, px, pm, xp.sqrt(sigma2), zero, zero], axis=1)
    return xp.where(valid[:, None], coef, xp.full_like(coef, math.nan))


# ---- public API ---------------------------------------------------------------------------------------


@_dispatch.eager_op
@torch.no_grad()
def sampler_step(x_t, model_output, t, s, schedule, *, method, eta=0.0, prediction="eps", gamma=None,
                 clip_denoised=None, clip_pixel=None, noise=None, generator=None, out=None):
    """One reverse diffusion step x_t -> x_s (s < t) for a batch, in one fused pass.

    Args:
        x_t: [B, ...] float32/float16/bfloat16 (float64 on CPU); samples at timestep t.
        model_output: the network output at (x_t, t), shape of x_t: eps, x0 or v (`prediction`).
        t, s: timestep indices, ints or integer tensors [B] (per sample), 1 <= t <= N, 0 <= s < t.
            s = 0 is the final step: the (clipped) x0_hat, no noise.
        schedule: a NoiseSchedule.
        method: 'ddpm' (posterior variance beta-tilde), 'ddpm-large' (variance beta_{t|s}),
            'ddim' (variance eta^2 beta-tilde; eta = 0 deterministic), 'analytic-ddpm' and
            'analytic-ddim' (Bao et al. 2022: the optimal variance lam2 + gam^2 Cbar_t from gamma,
            Cbar_t clipped to [0, R^2], R = half the clip range; stochastic even at eta = 0), or
            'ode-euler' (an Euler step of the VP probability-flow ODE in the timestep index; no noise).
        eta: DDIM's eta (ddim, analytic-ddim only).
        prediction: 'eps' | 'x0' | 'v' (v = a_t eps - sg_t x0).
        gamma: analytic methods: G_t = E||eps_theta(x_t, t)||^2 / d as a [N + 1] table (index t) or
            one number for all t.
        clip_denoised: clamp x0_hat: None (the default: [-1, 1] for the analytic methods, as the
            Analytic-DPM code; off otherwise), True ([-1, 1]), False, or (low, high). With clipping,
            the DDIM-form mean uses the clipped x0_hat and the unclipped eps_hat (reference behaviour).
        clip_pixel: None (off) or y > 0: cap the standard deviation of the noise this step adds at
            y (2/255) sqrt(pi/2), so that E|sigma z| <= y pixel levels of 8-bit data in [-1, 1]:
            Analytic-DPM's sampling-time clip (its clip_pixel), which its results apply on the last
            noisy step only (the step into tau_1: `sample(..., clip_pixel=y)` does that), with
            y = 2 for Analytic-DDPM on CIFAR10 (linear schedule) and CelebA, y = 1 otherwise.
            Applies to every sample of the call (not ode-euler: it adds no noise).
        noise: standard normal noise like x_t; if None it is drawn inside the kernel from a
            counter-based generator seeded from `generator` (a CPU torch.Generator) or from torch's
            default generator. Same seed -> same result on a backend; the numba, triton and reference
            backends draw the same integer stream and agree to float32 rounding, but do not promise it.
        out: optional contiguous output buffer like x_t. It may be x_t itself (the step runs in
            place); any other overlap with x_t, model_output or noise raises a ValueError.

    Returns x_s like x_t. Inference only: runs under no_grad, no autograd graph.
    """
    _check_arguments(x_t, model_output, schedule, method, eta, prediction, noise, out)
    batch = x_t.shape[0]
    device = x_t.device
    t_idx = _timesteps("t", t, batch, schedule.num_steps)
    s_idx = _timesteps("s", s, batch, schedule.num_steps)
    _check_order(t_idx, s_idx)
    check_zero_snr(schedule, t_idx, method, prediction)
    on_host = isinstance(t_idx, np.ndarray) and isinstance(s_idx, np.ndarray)
    if not on_host:  # one of them lives on the device: the prologue runs there
        t_idx, s_idx = (torch.from_numpy(v).to(device, non_blocking=True) if isinstance(v, np.ndarray)
                        else v.to(device) for v in (t_idx, s_idx))
    clip_range = _clip_range(clip_denoised, method)
    if method == "ode-euler" and clip_range is not None:
        raise ValueError(f"{_OP}: ode-euler does not use x0_hat; leave clip_denoised at None/False")
    table = _gamma_table(gamma, schedule, method)
    sigma2_max = noise_variance_cap(clip_pixel, method)
    if on_host:
        logab = schedule.log_alphas_cumprod.numpy()
        gamma_t = None if table is None else table[t_idx]
    else:
        logab = schedule.log_alphas_cumprod_on(device)
        gamma_t = None if table is None else torch.from_numpy(table).to(device)[t_idx.clamp(0, schedule.num_steps)]
    stochastic = not (method in DETERMINISTIC or (method == "ddim" and eta == 0))
    keys = None
    if stochastic and noise is None:
        keys = _rng.keys_from_seed(_rng.draw_seed(generator))

    backend = _dispatch.select(_OP, device.type,
                               lambda b: _dispatch.kernel_reason(_registry.DIFFUSION, b, x_t, "x_t"))
    if backend == "reference":
        if stochastic and noise is None:
            noise = reference.counter_normal(x_t.shape, keys, dtype=torch.float64, device=device)
        as_tensor = (lambda v: torch.as_tensor(v, device=device)) if on_host else (lambda v: v)
        result = reference.sampler_step(x_t, model_output, as_tensor(t_idx), as_tensor(s_idx), as_tensor(logab),
                                        method=method, eta=float(eta), prediction=prediction,
                                        gamma=None if gamma_t is None else as_tensor(gamma_t),
                                        clip_range=clip_range, noise=noise if stochastic else None,
                                        sigma2_max=sigma2_max)
        if out is None:
            return result
        return out.copy_(result)

    kernels = _registry.DIFFUSION.kernels(backend)
    coef = step_coefficients(logab, t_idx, s_idx, method=method, eta=float(eta), prediction=prediction,
                             gamma_t=gamma_t, clip_range=clip_range, sigma2_max=sigma2_max)
    if on_host and device.type == "cpu":
        coef = torch.from_numpy(coef)
    elif on_host:  # the GPU kernels read float32 coefficients: one small asynchronous upload
        coef = torch.from_numpy(coef.astype(np.float32)).to(device, non_blocking=True)
    flat = (batch, x_t.numel() // batch)
    x2 = x_t.reshape(flat)
    m2 = model_output.to(x_t.dtype).reshape(flat)
    z2 = noise.to(x_t.dtype).reshape(flat) if (stochastic and noise is not None) else None
    if out is None:
        out = torch.empty(x_t.shape, dtype=x_t.dtype, device=device)
    lo, hi = clip_range if clip_range is not None else (-math.inf, math.inf)
    kernels.sampler_step(x2.contiguous(), m2.contiguous(), None if z2 is None else z2.contiguous(), coef,
                         clip_range is not None, lo, hi, keys, out.view(flat))
    return out


def _eps_from(x, m, a, sg, prediction):
    if prediction == "eps":
        return m
    if prediction == "x0":
        return (x - a * m) / sg
    return sg * x + a * m


@torch.no_grad()
def heun_step(model, x_t, t, s, schedule, *, prediction="eps", model_output=None):
    """A second-order (Heun) step of the probability-flow ODE in rho = sg/a (Karras et al. 2022),
    two model calls: stage 1 is the fused DDIM (eta = 0) step = Euler in rho to x'; stage 2
    averages eps at (x_t, t) and at (x', s). Samples with s = 0 keep the Euler result (EDM
    convention: the model is not evaluated at sigma = 0).

    model(x, timesteps [B] int64) -> output of kind `prediction`; `model_output` is model(x_t, t)
    when you already have it. Inference only (no_grad).
    """
    _check_arguments(x_t, x_t if model_output is None else model_output, schedule, "ddim", 0.0, prediction, None, None)
    batch = x_t.shape[0]
    t_given = _timesteps("t", t, batch, schedule.num_steps)
    s_given = _timesteps("s", s, batch, schedule.num_steps)
    _check_order(t_given, s_given)
    check_zero_snr(schedule, t_given, "heun", prediction, op="heun_step")
    # the model takes timestep tensors on x_t's device (uploaded without a host sync: pageable memory is
    # staged at once); the fused step takes host values as they are
    t_idx, s_idx = (torch.from_numpy(np.ascontiguousarray(v)).to(x_t.device, non_blocking=True)
                    if isinstance(v, np.ndarray) else v.to(x_t.device) for v in (t_given, s_given))
    m1 = model(x_t, t_idx) if model_output is None else model_output
    x_euler = sampler_step(x_t, m1, torch.as_tensor(t_given), torch.as_tensor(s_given), schedule, method="ddim",
                           prediction=prediction, clip_denoised=False)
    final = s_idx == 0
    if isinstance(s_given, np.ndarray) and bool((s_given == 0).all()):
        return x_euler
    m2 = model(x_euler, s_idx)
    logab = schedule.log_alphas_cumprod_on(x_t.device)
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    lt, ls = logab[t_idx], logab[s_idx]
    a_t, sg_t = torch.exp(0.5 * lt), torch.sqrt(-torch.expm1(lt))
    a_s, sg_s = torch.exp(0.5 * ls), torch.sqrt(-torch.expm1(ls))
    work = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    col = {k: v.to(work).reshape(shape) for k, v in
           {"a_t": a_t, "sg_t": sg_t, "a_s": a_s, "sg_s": sg_s, "ratio": a_s / a_t,
            "drho": a_s * (sg_s / a_s - sg_t / a_t)}.items()}
    x = x_t.to(work)
    e1 = _eps_from(x, m1.to(work), col["a_t"], col["sg_t"], prediction)
    e2 = _eps_from(x_euler.to(work), m2.to(work), col["a_s"], col["sg_s"], prediction)
    x_heun = col["ratio"] * x + col["drho"] * 0.5 * (e1 + e2)
    return torch.where(final.reshape(shape), x_euler.to(work), x_heun).to(x_t.dtype)
