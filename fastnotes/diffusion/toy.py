"""A Gaussian mixture whose exact noise predictor is known in closed form: ground truth for
samplers (the Analytic-DPM quality test and examples/analytic_dpm_2d.py).

Data x0 ~ sum_k w_k N(mu_k, c_k^2 I). Under q(x_t | x0) = N(a x0, sg^2 I) (a = sqrt(ab_t),
sg = sqrt(1 - ab_t)) each component stays Gaussian, x_t | k ~ N(a mu_k, v_k I) with
v_k = a^2 c_k^2 + sg^2, so the optimal eps prediction E[eps | x_t] = -sg * score(x_t) is
    eps*(x_t) = sg * sum_k r_k(x_t) (x_t - a mu_k) / v_k,   r_k = posterior responsibility of k.
"""
import math

import torch


class GaussianMixture:
    """weights [K] (normalised here), means [K, d], stds [K] (isotropic components)."""

    def __init__(self, weights, means, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        k = self.weights.numel()
        if self.means.dim() != 2 or self.means.shape[0] != k or self.stds.shape != (k,):
            raise ValueError("GaussianMixture: need weights [K], means [K, d] and stds [K]")
        if bool((self.weights <= 0).any()) or bool((self.stds <= 0).any()):
            raise ValueError("GaussianMixture: weights and stds must be > 0")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self):
        return self.means.shape[1]

    def mean(self):
        return self.weights @ self.means

    def covariance(self):
        m = self.mean()
        centred = self.means - m
        second = (self.weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
        return second + (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)

    def sample(self, n, generator=None):
        """n draws, float64 [n, d]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def log_prob(self, x):
        """log density of the data distribution at x [n, d]."""
        return self._log_components(x.double(), 1.0, 0.0).logsumexp(dim=1)

    def _log_components(self, x, a, var_noise):
        v = a * a * self.stds**2 + var_noise  # [K]
        sq = ((x[:, None, :] - a * self.means[None]) ** 2).sum(-1)  # [n, K]
        return torch.log(self.weights) - 0.5 * sq / v - 0.5 * self.dim * torch.log(2 * math.pi * v)

    def eps_model(self, schedule):
        """The exact noise predictor model(x_t, t) for `schedule` (t int64 [B], our index 1..N), in
        float64, returned in x_t's dtype."""
        logab = schedule.log_alphas_cumprod

        def model(x, t):
            lt = logab[t.cpu()].to(torch.float64)[:, None]
            a, sg2 = torch.exp(0.5 * lt), -torch.expm1(lt)
            xd = x.double().reshape(x.shape[0], -1).cpu()
            v = a * a * self.stds[None] ** 2 + sg2  # [n, K]
            sq = ((xd[:, None, :] - a[:, :, None] * self.means[None]) ** 2).sum(-1)
            logr = torch.log(self.weights) - 0.5 * sq / v - 0.5 * self.dim * torch.log(v)
            r = torch.softmax(logr, dim=1)  # [n, K]
            eps = torch.sqrt(sg2) * ((r / v)[:, :, None] * (xd[:, None, :] - a[:, :, None] * self.means[None])).sum(1)
            return eps.reshape(x.shape).to(device=x.device, dtype=x.dtype)

        return model
