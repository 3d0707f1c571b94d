"""Su's training strategies derived from Amos (kexue.fm/archives/9344; docs/amos.md).

    step size  alpha_t u_t = alpha0 |eps0| decay_t u_t / |u_t|,  |eps0| = sqrt(k) sigma  (k = numel)
    decay      rho_t = alpha0^2 / (2 q) decay_t                   (q ~ 1)
    schedules  decay_quadratic(t)    = 1 / (a0p t + 1)^2,   a0p  = (sqrt 2 - 1) / T_half
               decay_inverse_time(t) = 1 / (2 a0p0 t + 1),  a0p0 = 1 / (2 T_half)

sigma is the tensor's init std (0.5 for zero-init biases and LayerNorm gains); it is exposed as is,
without the factor 2 of the exact derivation (|eps0|^2 ~ 2 k sigma^2) that Su absorbs. For Amos,
alpha0 plays the role of lr and sigma of eta. The decay functions plug into
torch.optim.lr_scheduler.LambdaLR through half_life_lambda.
"""
import math

import torch

from .. import reference

__all__ = ["decay_inverse_time", "decay_quadratic", "eps0_norm", "half_life_lambda", "inverse_time_rate",
           "lr_from_init_scale", "quadratic_rate", "su_step", "weight_decay_rate"]


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative_step(t):
    if isinstance(t, torch.Tensor):
        if bool((t < 0).any()):
            raise ValueError("t must be >= 0")
    elif t < 0:
        raise ValueError(f"t must be >= 0, got {t!r}")


def eps0_norm(numel, sigma):
    """|eps0| ~ sqrt(k) sigma: the expected distance from the init to the optimum of a tensor with k
    entries of scale sigma."""
    _positive("numel", numel)
    _positive("sigma", sigma)
    return math.sqrt(numel) * sigma


def lr_from_init_scale(alpha0, sigma, numel=None):
    """The step size tied to the initialisation scale. With numel: the norm of a whole-tensor step,
    alpha0 sqrt(k) sigma (for a direction normalised to unit norm, Su's form). Without: the
    per-entry step alpha0 sigma (for an elementwise-normalised direction, i.e. Amos's lr * eta)."""
    _positive("alpha0", alpha0)
    _positive("sigma", sigma)
    return alpha0 * (eps0_norm(numel, sigma) if numel is not None else sigma)


def weight_decay_rate(alpha0, q=1.0):
    """Decoupled weight decay per step tied to the relative learning rate: alpha0^2 / (2 q)."""
    _positive("alpha0", alpha0)
    _positive("q", q)
    return alpha0 * alpha0 / (2 * q)


def quadratic_rate(half_life):
    """a0p for decay_quadratic so that it halves at step half_life: (sqrt 2 - 1) / T."""
    _positive("half_life", half_life)
    return (math.sqrt(2.0) - 1.0) / half_life


def inverse_time_rate(half_life):
    """a0p0 for decay_inverse_time so that it halves at step half_life: 1 / (2 T)."""
    _positive("half_life", half_life)
    return 0.5 / half_life


def decay_quadratic(t, a0p):
    """1 / (a0p t + 1)^2: Su's schedule for a constant cosine p between update and error."""
    _positive("a0p", a0p)
    _non_negative_step(t)
    return 1.0 / (a0p * t + 1.0) ** 2


def decay_inverse_time(t, a0p0):
    """1 / (2 a0p0 t + 1): Su's schedule when p decays with the error (the one he prefers)."""
    _positive("a0p0", a0p0)
    _non_negative_step(t)
    return 1.0 / (2.0 * a0p0 * t + 1.0)


def half_life_lambda(half_life, kind="inverse_time"):
    """A step -> factor function for torch.optim.lr_scheduler.LambdaLR that halves at half_life:
    kind "inverse_time" (1 / (t/T + 1)) or "quadratic" (1 / ((sqrt 2 - 1) t/T + 1)^2)."""
    if kind == "inverse_time":
        rate = inverse_time_rate(half_life)
        return lambda t: decay_inverse_time(t, rate)
    if kind == "quadratic":
        rate = quadratic_rate(half_life)
        return lambda t: decay_quadratic(t, rate)
    raise ValueError(f"kind must be 'inverse_time' or 'quadratic', got {kind!r}")


@torch.no_grad()
def su_step(params, directions, *, alpha0, sigma, decay=1.0, q=1.0):
    """Su's normalised update in place, per tensor:
    theta <- theta - alpha0 sqrt(k) sigma decay u/|u| - alpha0^2/(2q) decay theta.
    sigma: one number or one per tensor. A zero direction applies the decay only."""
    params, directions = list(params), list(directions)
    if len(params) != len(directions):
        raise ValueError(f"su_step: {len(params)} params but {len(directions)} directions")
    sigmas = list(sigma) if isinstance(sigma, (list, tuple)) else [sigma] * len(params)
    if len(sigmas) != len(params):
        raise ValueError(f"su_step: {len(params)} params but {len(sigmas)} sigmas")
    _positive("alpha0", alpha0)
    _positive("q", q)
    if not (isinstance(decay, (int, float)) and 0 <= decay <= 1):
        raise ValueError(f"su_step: decay must be a number in [0, 1], got {decay!r}")
    for p, u, s in zip(params, directions, sigmas):
        _positive("sigma", s)
        if u.shape != p.shape:
            raise ValueError(f"su_step: direction of shape {tuple(u.shape)} for a parameter {tuple(p.shape)}")
        p.copy_(reference.amos.su_normalized_step(p.double(), u.double(), alpha0=alpha0, sigma=s, decay=decay, q=q))
