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


_MASK64 = (1 << 64) - 1


def _mix64(x):
    """splitmix64's finaliser: a bijection of 64-bit ints that spreads nearby keys apart."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_noise_seed(seed, t, index):
    """The torch.Generator seed of the noise draw for global sample `index` at timestep t under
    estimate_gamma(..., seed=seed): a 63-bit hash of (seed, t, index)."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ t) ^ index) >> 1


def _keyed_noise(batch, seed, t, first_index):
    gens = (torch.Generator().manual_seed(sample_noise_seed(seed, t, first_index + j)) for j in range(batch.shape[0]))
    return torch.stack([torch.randn(batch.shape[1:], generator=g, dtype=batch.dtype) for g in gens])


def _gamma_inputs(data, schedule, timesteps, n_samples, batch_size, seed, generator):
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError("estimate_gamma: schedule must be a NoiseSchedule")
    n = schedule.num_steps
    steps = list(range(1, n + 1)) if timesteps is None else [int(t) for t in timesteps]
    if any(not 1 <= t <= n for t in steps):
        raise ValueError(f"estimate_gamma: timesteps must lie in [1, {n}]")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"estimate_gamma: batch_size must be an int >= 1, got {batch_size!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"estimate_gamma: seed must be an int or None, got {type(seed).__name__}")
    if seed is not None and generator is not None:
        raise TypeError("estimate_gamma: pass seed= or generator=, not both")
    x0 = data(n_samples) if callable(data) else data[:n_samples]
    if not isinstance(x0, torch.Tensor) or x0.dim() < 1:
        raise TypeError("estimate_gamma: data must be a tensor [M, ...] or a callable returning one")
    return n, steps, x0


@torch.no_grad()
def estimate_gamma(model, data, schedule, timesteps=None, n_samples=100, *, batch_size=256, generator=None,
                   progress=True, seed=None, group=None):
    """Monte Carlo G_t = E||eps_theta(x_t, t)||^2 / d (paper Eq. 8) as a float64 [N + 1] table.

    model(x_t, t [B] int64) -> eps prediction; data: a tensor [M, ...] of training samples (the
    first n_samples are used) or a callable n -> [n, ...] batch. timesteps: the t to estimate
    (default 1..N); other entries are 0 (G_0 = 0). One noise draw per (sample, t): from `generator`
    in order (t, then sample) by default; with `seed` (an int), the draw of sample i at step t comes
    from its own generator seeded sample_noise_seed(seed, t, i), so it depends on neither the batch
    size nor how the samples are split.

    group: a torch.distributed ProcessGroup for data-parallel estimation. Each rank passes its own
    share as `data` (n_samples counts per rank, a rank may bring none) and `seed` (required, the
    same on every rank); sample i of rank r has global index (samples of ranks < r) + i. The
    per-timestep sums are all-reduced once, so every rank returns the same table, equal up to float64
    summation order to estimate_gamma(model, cat(shares in rank order), ..., n_samples=total,
    seed=seed) in one process (given a model whose output for a sample does not depend on the rest
    of its batch). Arguments are checked on every rank and agreed in one all_gather before any
    other collective, so a bad argument on one rank raises the same error on every rank; an error
    inside `model` on one rank still leaves the others waiting in the final all_reduce until the
    group's timeout. Progress is shown on group rank 0 only."""
    if group is None:
        n, steps, x0 = _gamma_inputs(data, schedule, timesteps, n_samples, batch_size, seed, generator)
        if x0.shape[0] < 1:
            raise ValueError("estimate_gamma: no data")
        offset, total_count, rank = 0, x0.shape[0], 0
    else:
        from .. import _distributed
        rank, _ = _distributed.check_group("estimate_gamma", group)
        error, facts = None, None
        try:
            if seed is None:
                raise ValueError("estimate_gamma: group= needs seed= (an int, the same on every rank): the noise "
                                 "is drawn per global sample index so that the table does not depend on the split")
            n, steps, x0 = _gamma_inputs(data, schedule, timesteps, n_samples, batch_size, seed, generator)
            facts = (n, steps, seed, tuple(x0.shape[1:]), int(x0.shape[0]))
        except Exception as exc:  # agreed below: every rank raises it
            error = exc
        gathered = _distributed.gather_checked("estimate_gamma", group, error, facts)
        for name, i in (("the schedule's num_steps", 0), ("timesteps", 1), ("seed", 2), ("the sample shape", 3)):
            if any(f[i] != gathered[0][i] for f in gathered):
                raise ValueError(f"estimate_gamma: {name} differs between ranks of the group: "
                                 f"{[f[i] for f in gathered]}")
        counts = [f[4] for f in gathered]
        offset, total_count = sum(counts[:rank]), sum(counts)
        if total_count < 1:
            raise ValueError("estimate_gamma: no data on any rank of the group")
    ab = schedule.alphas_cumprod
    show = progress and rank == 0
    iterator = _tqdm(steps, desc="estimate_gamma", disable=not show) if _tqdm is not None else steps
    if group is None and seed is None:  # the original path, draw for draw
        table = torch.zeros(n + 1, dtype=torch.float64)
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
    sums = torch.zeros(len(steps), dtype=torch.float64)
    for k, t in enumerate(iterator):
        total = 0.0
        for lo in range(0, x0.shape[0], batch_size):
            batch = x0[lo:lo + batch_size]
            eps = _keyed_noise(batch, seed, t, offset + lo).to(batch.device)
            x_t = math.sqrt(ab[t]) * batch + math.sqrt(1 - ab[t]) * eps
            out = model(x_t, torch.full((batch.shape[0],), t, dtype=torch.int64, device=batch.device))
            total += float(out.double().pow(2).mean(dim=tuple(range(1, out.dim()))).sum())
        sums[k] = total
    if group is not None:
        _distributed.all_reduce_sum({group: [sums]})
    table = torch.zeros(n + 1, dtype=torch.float64)
    table[torch.tensor(steps, dtype=torch.int64)] = sums / total_count
    return table
