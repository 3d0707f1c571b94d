"""Zero terminal SNR schedules (NoiseSchedule(zero_terminal_snr=True), ab_N = 0): the steps that
need no division by a_t run on every backend and equal the float64 formulas; the ones that would
divide by a_N = 0 are refused (host timesteps) or give NaN rows (device-side coefficients)."""
import math

import numpy as np
import pytest
import torch

from fastnotes.diffusion import NoiseSchedule, heun_step, sample, sampler_step
from fastnotes.diffusion.step import step_coefficients

N = 50


def zero_snr_betas(n=N):
    betas = np.linspace(1e-3, 0.2, n)
    betas[-1] = 1.0
    return betas


SCHEDULE = NoiseSchedule(betas=zero_snr_betas(), zero_terminal_snr=True)


def test_schedule():
    assert SCHEDULE.zero_terminal_snr and float(SCHEDULE.alphas_cumprod[N]) == 0
    assert float(SCHEDULE.log_alphas_cumprod[N]) == -math.inf and float(SCHEDULE.betas[N]) == 1
    assert not NoiseSchedule(betas=np.linspace(1e-3, 0.2, N)).zero_terminal_snr
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(betas=zero_snr_betas())  # not declared
    with pytest.raises(ValueError, match="exactly 1"):
        NoiseSchedule(betas=np.linspace(1e-3, 0.2, N), zero_terminal_snr=True)
    bad = zero_snr_betas()
    bad[3] = 1.0
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(betas=bad, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="needs betas"):
        NoiseSchedule(alphas_cumprod=[0.5, 0.2], zero_terminal_snr=True)
    with pytest.raises(TypeError, match="zero_terminal_snr"):
        NoiseSchedule(betas=zero_snr_betas(), zero_terminal_snr=1)


@pytest.mark.parametrize("method", ["ddpm", "ddpm-large", "ddim"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_steps_from_t_equal_n(backend, method, prediction):
    """From t = N (a_t = 0, sg_t = 1): x0_hat = -v (v) or m (x0), eps_hat = x_t; against the formulas."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(3, 70, generator=gen, dtype=torch.float64) for _ in range(3))
    s = torch.tensor([N - 7, 1, 0])
    eta = 0.6 if method == "ddim" else 0.0
    got = sampler_step(x.to(dtype), m.to(dtype), N, s, SCHEDULE, method=method, eta=eta, prediction=prediction,
                       noise=z.to(dtype)).double()
    ab_s = SCHEDULE.alphas_cumprod[s].reshape(-1, 1)
    x0 = -m if prediction == "v" else m
    if method == "ddim":  # bt = (1 - ab_s) be / (1 - ab_t) with be = 1, 1 - ab_t = 1
        lam2 = eta**2 * (1 - ab_s)
        expected = ab_s.sqrt() * x0 + (1 - ab_s - lam2).sqrt() * x + lam2.sqrt() * z
    else:  # the posterior mean is a_s x0_hat (the x_t coefficient has sqrt(ab_t)); variance 1 - ab_s or 1
        var = (1 - ab_s) if method == "ddpm" else torch.ones_like(ab_s)
        var[s == 0] = 0
        expected = ab_s.sqrt() * x0 + var.sqrt() * z
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("method, prediction", [("ddpm", "eps"), ("ddim", "eps"), ("analytic-ddpm", "v"),
                                                ("analytic-ddim", "x0"), ("ode-euler", "v")])
def test_division_by_a_n_is_refused(method, prediction):
    x = torch.zeros(2, 5, dtype=torch.float64)
    kwargs = {"gamma": 0.5} if method.startswith("analytic") else {}
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sampler_step(x, x, torch.tensor([N, N - 1]), 3, SCHEDULE, method=method, prediction=prediction, **kwargs)
    sampler_step(x, x, N - 1, 3, SCHEDULE, method=method, prediction=prediction, **kwargs)  # a_t > 0: fine
    # the device-side prologue (torch timesteps) marks such rows NaN instead of dividing by 0
    coef = step_coefficients(SCHEDULE.log_alphas_cumprod, torch.tensor([N, N - 1]), torch.tensor([3, 3]),
                             method=method, eta=0.0, prediction=prediction,
                             gamma_t=torch.full((2,), 0.5, dtype=torch.float64), clip_range=None)
    assert torch.isnan(coef[0]).all() and torch.isfinite(coef[1]).all()


def test_heun_and_sample_refuse_t_equal_n():
    x = torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        heun_step(lambda x, t: x, x, N, 3, SCHEDULE, prediction="v")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sample(lambda x, t: x, (2, 5), SCHEDULE, 5, "ddim", prediction="eps", progress=False)
    out = sample(lambda x, t: 0.1 * x, (2, 5), SCHEDULE, 5, "ddim", prediction="v", progress=False,
                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
