"""Analytic-DPM toolkit (Bao et al. 2022; docs/diffusion.md): host-side
float64 work, not kernel work.

    even_trajectory(N, K)                 the ET trajectory [1, ..., N] (half-to-even rounding)
    optimal_variance(schedule, gamma, t, s, eta=..., kind=...)   sigma*^2_{s|t} per step
    optimal_trajectory(schedule, gamma, K)  the DP over the KL costs (DDPM type)
    estimate_gamma(model, data, schedule, timesteps, n_samples)  Monte Carlo G_t
"""
import math

import torch

from ..reference import diffusion as reference
from .schedule import NoiseSchedule

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # tqdm is optional
    _tqdm = None


def even_trajectory(num_steps, k):
    """K timesteps from 1 to N with stride (N-1)/(K-1), accumulated in floats and rounded half to
    even (Python round), as the Analytic-DPM code."""
    if not (isinstance(k, int) and isinstance(num_steps, int) and 2 <= k <= num_steps):
        raise ValueError(f"even_trajectory: need ints 2 <= K <= N, got N={num_steps!r}, K={k!r}")
    stride = (num_steps - 1) / (k - 1)
    out, position = [], 1.0
    for _ in range(k):
        out.append(round(position))
        position += stride
    return out


def _table(schedule, gamma):
    n = schedule.num_steps
    if isinstance(gamma, (int, float)):
        return torch.full((n + 1,), float(gamma), dtype=torch.float64)
    g = torch.as_tensor(gamma, dtype=torch.float64).cpu()
    if g.shape != (n + 1,):
        raise ValueError(f"gamma must be a number or have shape [{n + 1}] (G_t for t = 0..N), got {tuple(g.shape)}")
    return g


def optimal_variance(schedule, gamma, t, s, *, kind="ddpm", eta=0.0, data_range=(-1.0, 1.0)):
    """sigma*^2_{s|t} = lam2 + gam^2 clip((1-ab_t)/ab_t (1 - G_t), 0, R^2) as float64 [len(t)]:
    kind 'ddpm' (lam2 = beta-tilde) or 'ddim' (lam2 = eta^2 beta-tilde); data_range (a, b) gives
    R = (b - a)/2 (None: no upper clip); 0 where s = 0."""
    if kind not in ("ddpm", "ddim"):
        raise ValueError(f"optimal_variance: kind must be 'ddpm' or 'ddim', got {kind!r}")
    t = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
    s = torch.as_tensor(s, dtype=torch.int64).reshape(-1).expand(t.shape)
    cov_max = math.inf if data_range is None else ((data_range[1] - data_range[0]) / 2) ** 2
    g = _table(schedule, gamma)[t]
    return reference.step_scalars(schedule.log_alphas_cumprod, t, s, method=f"analytic-{kind}", eta=eta, gamma=g,
                                  cov_max=cov_max)["sigma2"]


def step_costs(schedule, gamma):
    """F[s, t] = log(1 - be_ts G_t / (1 - ab_t)) for 1 <= s < t <= N (inf elsewhere): the part of
    the KL cost J(s, t) that does not telescope along a trajectory (DDPM type)."""
    logab = schedule.log_alphas_cumprod
    g = _table(schedule, gamma)
    n = schedule.num_steps
    idx = torch.arange(n + 1)
    be = -torch.expm1(logab[None, :] - logab[:, None])  # [s, t]
    arg = 1 - be * (g / -torch.expm1(logab))[None, :].nan_to_num(0.0)
    cost = torch.log(arg.clamp_min(1e-300))
    cost[arg <= 0] = math.inf
    valid = (idx[:, None] >= 1) & (idx[:, None] < idx[None, :])
    return torch.where(valid, cost, torch.full_like(cost, math.inf))


def _shortest_path(f, k, end):
    """The K-node path 1 = tau_1 < ... < tau_K = end minimising sum F[tau_{k-1}, tau_k], and its cost."""
    f = f[: end + 1, : end + 1]
    best = f[1].clone()  # best[n] = cost of the best 2-node path 1 -> n
    back = []
    for _ in range(3, k + 1):
        best, arg = (best[:, None] + f).min(dim=0)  # over s, for every n
        back.append(arg)
    path = [end]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    path.append(1)
    return path[::-1], float(best[end])


def optimal_trajectory(schedule, gamma, k):
    """The K-node trajectory 1 = tau_1 < ... < tau_K = N minimising sum_k F[tau_{k-1}, tau_k] (the
    shortened process' KL up to constants, Analytic-DPM section 4), by dynamic programming in
    O(K N^2) time and O(N^2) memory. Returns (trajectory list, cost).

    When some G_n > 1 (model error near t = N: the cost's log argument can go <= 0), it falls back as
    the Analytic-DPM code does: with n0 the first such n and b = 2 (N - n0 + 1), the DP runs on
    [1, N - b] with ceil((1 - 0.8 b / N) K) nodes and the other nodes are spread evenly over
    (N - b, N]; the returned cost is then that of the DP part."""
    n = schedule.num_steps
    if not (isinstance(k, int) and 2 <= k <= n):
        raise ValueError(f"optimal_trajectory: need an int 2 <= K <= N = {n}, got {k!r}")
    g = _table(schedule, gamma)
    f = step_costs(schedule, g)
    bad = torch.nonzero(g[1:] > 1).reshape(-1)
    if bad.numel() == 0:
        path, cost = _shortest_path(f, k, n)
    else:
        num_bad = 2 * (n - (int(bad[0]) + 1) + 1)
        end = n - num_bad
        k1 = min(k - 1, end, max(2, math.ceil((1 - 0.8 * num_bad / n) * k)))
        if end < 2 or k1 < 2:
            raise ValueError(f"optimal_trajectory: G_t > 1 from t = {int(bad[0]) + 1} on leaves too few steps for "
                             f"a trajectory of {k} nodes; re-estimate gamma or use even_trajectory")
        k2 = k - k1
        path, cost = _shortest_path(f, k1, end)
        path += [round(n - (n - end) / k2 * i) for i in range(k2)][::-1]
    if not math.isfinite(cost):
        raise ValueError("optimal_trajectory: no finite-cost trajectory (G_t > 1 near t = N?)")
    return path, cost


@torch.no_grad()
def estimate_gamma(model, data, schedule, timesteps=None, n_samples=100, *, batch_size=256, generator=None,
                   progress=True):
    """Monte Carlo G_t = E||eps_theta(x_t, t)||^2 / d (paper Eq. 8) as a float64 [N + 1] table.

    model(x_t, t [B] int64) -> eps prediction; data: a tensor [M, ...] of training samples (the
    first n_samples are used) or a callable n -> [n, ...] batch. timesteps: the t to estimate
    (default 1..N); other entries are 0 (G_0 = 0). One noise draw per (sample, t)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError("estimate_gamma: schedule must be a NoiseSchedule")
    n = schedule.num_steps
    steps = list(range(1, n + 1)) if timesteps is None else [int(t) for t in timesteps]
    if any(not 1 <= t <= n for t in steps):
        raise ValueError(f"estimate_gamma: timesteps must lie in [1, {n}]")
    x0 = data(n_samples) if callable(data) else data[:n_samples]
    if x0.shape[0] < 1:
        raise ValueError("estimate_gamma: no data")
    table = torch.zeros(n + 1, dtype=torch.float64)
    ab = schedule.alphas_cumprod
    iterator = _tqdm(steps, desc="estimate_gamma", disable=not progress) if _tqdm is not None else steps
    for t in iterator:
        total = 0.0
        for lo in range(0, x0.shape[0], batch_size):
            batch = x0[lo:lo + batch_size]
            eps = torch.randn(batch.shape, generator=generator, dtype=batch.dtype).to(batch.device)
            x_t = math.sqrt(ab[t]) * batch + math.sqrt(1 - ab[t]) * eps
            out = model(x_t, torch.full((batch.shape[0],), t, dtype=torch.int64, device=batch.device))
            total += float(out.double().pow(2).mean(dim=tuple(range(1, out.dim()))).sum())
        table[t] = total / x0.shape[0]
    return table
