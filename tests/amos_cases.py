"""Shared Amos test helpers: the long double oracle of docs/amos.md section 3 and the path rule."""
import numpy as np
import torch

SPEC_DEFAULTS = {"beta": 0.999, "c_coef": 0.25, "d_coef": 0.25, "extra_l2": 0.0, "epsilon": 2.0 ** -125,
                 "clip_value": None, "momentum": None}


def wide_run(theta0, grads, slot_shape, state=None, v_max=None, **hyper):
    """Trajectory (float64 thetas, clipped to the float64 range) and the final long double (v, b) of
    Amos from `state` = (v, b, m, count) or zeros; every hyper-parameter must be given. With v_max,
    v is stored saturated at v_max after each step (a step itself uses its exact v), as the package
    does at the largest finite value of the state dtype."""
    w = np.longdouble
    theta = theta0.double().numpy().astype(w)
    shape = theta.shape
    axes = tuple(range(len(shape))) if slot_shape == () else tuple(
        a for a in range(len(shape)) if slot_shape[a] == 1 and shape[a] != 1)
    if state is None:
        state = (torch.zeros(slot_shape), torch.zeros(slot_shape), torch.zeros(shape), 0)
    v, b, m = (s.double().numpy().astype(w) for s in state[:3])
    lr, eta, beta = w(hyper["lr"]), w(hyper["eta"]), w(hyper["beta"])
    path = []
    for i, g in enumerate(grads):
        t = state[3] + i + 1
        g = g.double().numpy().astype(w)
        if hyper["clip_value"] is not None:
            g = np.clip(g, -w(hyper["clip_value"]), w(hyper["clip_value"]))
        g2 = (g * g).mean(axis=axes, keepdims=True).reshape(slot_shape) if axes else g * g
        v = beta * v + (1 - beta) * g2
        r = (1 - beta ** t) / np.maximum(v, w(hyper["epsilon"]))
        gamma = lr * lr * r * g2 / np.sqrt(1 + w(hyper["c_coef"]) * np.sqrt(lr) * b)
        delta = 1 / (1 + w(hyper["d_coef"]) * np.sqrt(lr * eta) * b)
        update = delta * (-(gamma / 2 + w(hyper["extra_l2"])) * theta - lr * eta * np.sqrt(r) * g)
        b = b + gamma * (1 + b)
        if v_max is not None:
            v = np.minimum(v, w(v_max))
        if hyper["momentum"] is not None:
            m = w(hyper["momentum"]) * m + (1 - w(hyper["momentum"])) * update
            update = m
        theta = theta + update
        path.append(torch.from_numpy(np.asarray(np.clip(theta, -1e308, 1e308), dtype=np.float64)))
    return path, v, b


def as_float64(wide, dtype=torch.float64):
    """A long double array as float64, saturated at the largest finite value of `dtype`."""
    return torch.from_numpy(np.asarray(np.minimum(wide, np.longdouble(torch.finfo(dtype).max)), dtype=np.float64))


def assert_path_close(got, exact, composite, what, theta0=None):
    """The package rule along a trajectory: |got - exact| <= 2 |composite - exact| + a floor of 8
    float32 roundoffs per step taken (the chain of per-slot coefficients rounds about that often) of
    the larger of the parameter and its starting point (theta0, then the previous exact step), which
    bounds the step."""
    previous = theta0
    for t, (a, e, c) in enumerate(zip(got, exact, composite)):
        sizes = [1.0] + [x.abs().max().item() for x in (e, previous) if x is not None and x.numel()]
        scale = max(sizes)
        err = (a.double() - e).abs().max().item() if e.numel() else 0.0
        composite_err = (c.double() - e).abs().max().item() if e.numel() else 0.0
        floor = 8 * torch.finfo(torch.float32).eps * (t + 1) * scale if a.dtype != torch.float64 else 1e-13 * scale
        assert torch.isfinite(a).all(), f"{what}: step {t + 1}: non-finite parameter"
        assert err <= 2 * composite_err + floor, (
            f"{what}: step {t + 1}: error {err:.3g} > 2 x composite {composite_err:.3g} + {floor:.3g}")
        previous = e
