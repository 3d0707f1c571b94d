"""Noise schedules for discrete-time diffusion (docs/diffusion.md, 'The math').

Index convention (the Analytic-DPM reference code): tables have length N + 1 with beta_0 = 0 and
alphas_cumprod_0 = 1, so index 0 is the clean data and the noisy timesteps are 1..N. Everything is
kept in float64 as log(alphas_cumprod), from which the stable forms of every coefficient follow
(1 - ab = -expm1(log ab) keeps its digits near t = 0).
"""
import math

import numpy as np
import torch

_OP = "NoiseSchedule"


def _as_float64_vector(name, value):
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{_OP}: {name} must be real, got {value.dtype}")
        out = value.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            out = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(f"{_OP}: {name} must be a sequence of numbers, got {type(value).__name__}") from None
    if out.dim() != 1 or out.numel() < 1:
        raise ValueError(f"{_OP}: {name} must be a non-empty 1-D sequence (one value per timestep 1..N), "
                         f"got shape {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{_OP}: {name} must be finite")
    return out.clone()


class NoiseSchedule:
    """A discrete variance-preserving schedule: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I).

    Build it from exactly one of
        betas: [N] values beta_1..beta_N, each in (0, 1);
        alphas_cumprod: [N] values ab_1..ab_N, strictly decreasing, in (0, 1).
    (Do not include the t = 0 entry; it is added: beta_0 = 0, ab_0 = 1.) Or use
    NoiseSchedule.linear(N) / NoiseSchedule.cosine(N).

    zero_terminal_snr=True (with betas only) declares a schedule whose last beta is exactly 1, so
    ab_N = 0 (log_alphas_cumprod[N] = -inf): Lin et al. 2023's zero terminal SNR, diffusers'
    rescale_betas_zero_snr. Steps from t = N then have a_t = 0: the x0 and v predictions step
    from it with ddpm / ddpm-large / ddim; an eps prediction (x0_hat = (x - sg_t eps)/a_t), the
    analytic methods (C_t = (1 - ab_t)/ab_t (1 - G_t)) and the ODE methods are refused there.

    Attributes (float64 CPU tensors of length N + 1): log_alphas_cumprod, alphas_cumprod, betas.
    num_steps = N; zero_terminal_snr.
    """

    def __init__(self, *, betas=None, alphas_cumprod=None, zero_terminal_snr=False):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError(f"{_OP}: give exactly one of betas and alphas_cumprod")
        if not isinstance(zero_terminal_snr, bool):
            raise TypeError(f"{_OP}: zero_terminal_snr must be a bool, got {zero_terminal_snr!r}")
        if zero_terminal_snr and betas is None:
            raise ValueError(f"{_OP}: zero_terminal_snr=True needs betas= (the last one exactly 1)")
        if betas is not None:
            b = _as_float64_vector("betas", betas)
            inside = (b > 0) & (b < 1)
            if zero_terminal_snr:
                if float(b[-1]) != 1.0:
                    raise ValueError(f"{_OP}: zero_terminal_snr=True needs the last beta to be exactly 1, "
                                     f"got {float(b[-1])!r}")
                inside[-1] = True
            if not bool(inside.all()):
                bad = int(torch.nonzero(~inside)[0]) + 1
                raise ValueError(f"{_OP}: betas must lie in (0, 1){' (but the last, 1)' if zero_terminal_snr else ''}; "
                                 f"betas[t={bad}] = {float(b[bad - 1])!r}")
            logab = torch.cumsum(torch.log1p(-b), 0)  # log1p(-1) = -inf: ab_N = 0
        else:
            ab = _as_float64_vector("alphas_cumprod", alphas_cumprod)
            if not bool(((ab > 0) & (ab < 1)).all()):
                raise ValueError(f"{_OP}: alphas_cumprod must lie in (0, 1) (index 0, ab = 1, is added for you)")
            if ab.numel() > 1 and not bool((ab[1:] < ab[:-1]).all()):
                raise ValueError(f"{_OP}: alphas_cumprod must be strictly decreasing")
            logab = torch.log(ab)
        if not bool((logab[1:] < logab[:-1]).all()) if logab.numel() > 1 else False:
            raise ValueError(f"{_OP}: alphas_cumprod must be strictly decreasing (betas too small to resolve)")
        self.log_alphas_cumprod = torch.cat([torch.zeros(1, dtype=torch.float64), logab])
        self.num_steps = logab.numel()
        self.zero_terminal_snr = zero_terminal_snr
        self._device_tables = {}

    # ---- constructors -----------------------------------------------------------------------

    @classmethod
    def linear(cls, num_steps, beta_start=1e-4, beta_end=0.02):
        """Ho et al.: beta_i = linspace(beta_start * 1000/N, beta_end * 1000/N, N)."""
        n = _check_steps(num_steps)
        scale = 1000.0 / n
        return cls(betas=np.linspace(beta_start * scale, beta_end * scale, n))

    @classmethod
    def cosine(cls, num_steps, offset=0.008, max_beta=0.999):
        """Nichol & Dhariwal: beta_i = min(1 - abar(i/N)/abar((i-1)/N), max_beta),
        abar(u) = cos((u + offset)/(1 + offset) * pi/2)^2."""
        n = _check_steps(num_steps)
        u = np.arange(n + 1, dtype=np.float64) / n
        abar = np.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
        return cls(betas=np.minimum(1 - abar[1:] / abar[:-1], max_beta))

    # ---- tables -------------------------------------------------------------------------------

    @property
    def alphas_cumprod(self):
        return torch.exp(self.log_alphas_cumprod)

    @property
    def betas(self):
        """[N + 1], betas[0] = 0."""
        return torch.cat([torch.zeros(1, dtype=torch.float64),
                          -torch.expm1(self.log_alphas_cumprod[1:] - self.log_alphas_cumprod[:-1])])

    def log_alphas_cumprod_on(self, device):
        """log(alphas_cumprod) as a float64 tensor on `device` (cached)."""
        device = torch.device(device)
        table = self._device_tables.get(device)
        if table is None:
            table = self.log_alphas_cumprod.to(device)
            self._device_tables[device] = table
        return table

    def __len__(self):
        return self.num_steps

    def __repr__(self):
        ab = self.alphas_cumprod
        return f"NoiseSchedule(N={self.num_steps}, ab_1={float(ab[1]):.6g}, ab_N={float(ab[-1]):.6g})"


def _check_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"{_OP}: num_steps must be a positive int, got {num_steps!r}")
    return int(num_steps)
