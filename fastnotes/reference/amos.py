"""Amos (Tian & Parikh 2022, jestimator) in plain torch: the float64 test oracle of the fused step and
the fallback backend. Math and oracles: docs/amos.md.

One step on one tensor theta with gradient g and the incremented (1-based) count t:
    g    <- clip(g, -clip_value, clip_value)                     (if clip_value is set)
    g2   = mean of g^2 over the reduced axes (keepdims)         (slot axis < theta axis)
    v    <- beta v + (1 - beta) g2
    r    = (1 - beta^t) / max(v, epsilon)
    gam  = lr^2 r g2 / sqrt(1 + c sqrt(lr) b)                   (old b)
    dlt  = 1 / (1 + d sqrt(lr eta) b)                           (old b)
    D    = dlt (-(gam/2 + extra_l2) theta - lr eta sqrt(r) g)
    b    <- b + gam (1 + b)
    [m   <- mu m + (1 - mu) D ;  D <- m]                        (momentum, not debiased)
    theta <- theta + D
"""
import math

import torch


def reduced_axes(param_shape, slot_shape):
    """The axes of a parameter that its slot shape averages over; a scalar slot () averages all.
    An axis is reduced when the slot has size 1 there and the parameter does not."""
    param_shape, slot_shape = tuple(param_shape), tuple(slot_shape)
    if slot_shape == ():
        return tuple(range(len(param_shape)))
    if len(slot_shape) != len(param_shape):
        raise ValueError(f"slot shape {slot_shape} must be () or have one entry per axis of {param_shape}")
    axes = []
    for axis, (p, s) in enumerate(zip(param_shape, slot_shape)):
        if s == p:
            continue
        if s != 1:
            raise ValueError(f"slot shape {slot_shape} must have 1 or the parameter's size on each axis of {param_shape}")
        axes.append(axis)
    return tuple(axes)


def amos_update(param, grad, v, b, step, *, lr, eta, beta=0.999, c_coef=0.25, d_coef=0.25, extra_l2=0.0,
                epsilon=2.0 ** -125, clip_value=None, momentum=None, m=None):
    """One Amos step for one tensor, computed in the dtype of `param` (float64 for the oracle).

    param, grad: tensors of one shape; v, b: slots of the reduced shape (broadcastable to param);
    step: the incremented count t >= 1; m: the momentum slot when momentum is set.
    Returns new tensors (param, v, b, m); m is None without momentum. Nothing is written in place.
    Any finite gradient gives a finite step: the squares are scaled where they would overflow, and
    v is returned saturated at the dtype's largest value (the step uses its exact value). An empty
    tensor's step changes nothing.
    """
    dtype = param.dtype
    if param.numel() == 0:  # nothing to average or update
        return (param.clone(), v.to(dtype, copy=True), b.to(dtype, copy=True),
                None if momentum is None else m.to(dtype, copy=True))
    g = grad.to(dtype)
    if clip_value is not None:
        g = g.clamp(-clip_value, clip_value)
    axes = reduced_axes(param.shape, v.shape)
    # g^2 overflows above sqrt(max) (1.8e19 in float32): square g / unit instead, unit a power of two
    # at the slot's largest |g| (exact scaling), and carry v and the epsilon guard in units of unit^2.
    big = g.abs().amax(dim=axes, keepdim=True) if axes else g.abs()
    unit = torch.pow(2.0, (torch.frexp(big).exponent - 1).clamp_min(0).to(dtype)).reshape(v.shape)
    gs = g / unit
    g2 = (gs * gs).mean(dim=axes, keepdim=True).reshape(v.shape) if axes else gs * gs  # mean g^2 / unit^2
    u = beta * (v.to(dtype) / unit / unit) + (1 - beta) * g2                          # new v / unit^2
    v_new = (u * unit * unit).clamp_max(torch.finfo(dtype).max)  # stored saturated, never inf
    guarded = torch.maximum(u, epsilon / unit / unit)            # max(v, epsilon) / unit^2
    bias = 1 - beta ** step                                      # r = bias / (guarded unit^2)
    b_old = b.to(dtype)
    gamma = lr * lr * (bias * g2 / guarded) / torch.sqrt(1 + c_coef * math.sqrt(lr) * b_old)
    delta = 1 / (1 + d_coef * math.sqrt(lr * eta) * b_old)
    update = delta * (-(gamma / 2 + extra_l2) * param - lr * eta * torch.sqrt(bias / guarded) * gs)
    b_new = b_old + gamma * (1 + b_old)
    m_new = None
    if momentum is not None:
        m_new = momentum * m.to(dtype) + (1 - momentum) * update
        update = m_new
    return param + update, v_new, b_new, m_new


def su_normalized_step(param, direction, *, alpha0, sigma, decay=1.0, q=1.0):
    """Su's update (kexue.fm/archives/9344): theta - alpha0 sqrt(k) sigma decay u/|u| - alpha0^2/(2q) decay theta,
    with k = numel. A zero direction takes only the decay. Returns a new tensor."""
    norm = direction.norm()
    unit = torch.where(norm > 0, direction / torch.where(norm > 0, norm, 1.0), torch.zeros_like(direction))
    step_norm = alpha0 * math.sqrt(param.numel()) * sigma * decay
    return param - step_norm * unit - alpha0 * alpha0 / (2 * q) * decay * param
