"""Self-check cases for the fused diffusion sampler step."""
import torch

from ..diffusion import NoiseSchedule, sampler_step
from ..reference import diffusion as reference_diffusion
from ._common import fresh_generator

_DIFFUSION_SCHEDULE = NoiseSchedule.linear(1000)


def _sampler_step_check(device, dtype):
    """analytic-DDPM step with clipping against the float64 reference, given the same noise. The
    sampler is inference only: no gradient to check."""
    gen = fresh_generator()
    shape = (8, 3, 17, 19)
    x, eps, z = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.randint(2, 1001, (8,), generator=gen)
    s = (torch.rand(8, generator=gen, dtype=torch.float64) * t).long().clamp(max=t - 1)
    gamma = torch.rand(1001, generator=gen, dtype=torch.float64)
    exact = reference_diffusion.sampler_step(x, eps, t, s, _DIFFUSION_SCHEDULE.log_alphas_cumprod,
                                             method="analytic-ddpm", gamma=gamma[t], clip_range=(-1.0, 1.0), noise=z)
    got = sampler_step(x.to(device=device, dtype=dtype), eps.to(device=device, dtype=dtype), t.to(device),
                       s.to(device), _DIFFUSION_SCHEDULE, method="analytic-ddpm", gamma=gamma,
                       noise=z.to(device=device, dtype=dtype))
    # Error per element relative to the size of the terms that produced it: near the end of the
    # schedule x0_hat = (x - sg_t eps) / a_t multiplies the inputs by up to 1/a_t ~ 150, and so their
    # float32 rounding; a plain max(1, |x_s|) scale would flag that rounding as a failure.
    sc = reference_diffusion.step_scalars(_DIFFUSION_SCHEDULE.log_alphas_cumprod, t, s, method="ddpm")
    a_t, sg_t = (sc[k].reshape(-1, 1, 1, 1) for k in ("a_t", "sg_t"))
    magnitude = 1.0 + exact.abs() + (x.abs() + sg_t * eps.abs()) / a_t + eps.abs() + z.abs()
    return {"value_error": ((got.double().cpu() - exact).abs() / magnitude).max().item(), "grad_error": 0.0}


def _sampler_step_timing(device):
    x = torch.randn(64, 3, 64, 64, device=device)
    eps = torch.randn(64, 3, 64, 64, device=device)
    t = torch.full((64,), 500, device=device)
    s = torch.full((64,), 480, device=device)
    logab = _DIFFUSION_SCHEDULE.log_alphas_cumprod_on(device)

    def fused():
        sampler_step(x, eps, 500, 480, _DIFFUSION_SCHEDULE, method="ddpm", clip_denoised=True)

    def composite():
        reference_diffusion.sampler_step_composite(x, eps, t, s, logab, method="ddpm", clip_range=(-1.0, 1.0),
                                                   noise=torch.randn_like(x))

    return {"shape": "64x3x64x64 fp32 step", "fused": fused, "composite": composite}


CASES = {"sampler_step": (_sampler_step_check, _sampler_step_timing)}
