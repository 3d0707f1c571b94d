"""Diffusion sampling (specs/diffusion.md): noise schedules, the fused batched sampler step
(DDPM, DDIM, Analytic-DPM, probability-flow ODE) and a Heun helper."""
from .schedule import NoiseSchedule
from .step import METHODS, PREDICTIONS, heun_step, sampler_step

__all__ = ["METHODS", "NoiseSchedule", "PREDICTIONS", "heun_step", "sampler_step"]
from .analytic import estimate_gamma, even_trajectory, optimal_trajectory, optimal_variance, step_costs

__all__ += ["estimate_gamma", "even_trajectory", "optimal_trajectory", "optimal_variance", "step_costs"]
