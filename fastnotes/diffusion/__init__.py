"""Diffusion sampling (docs/diffusion.md): noise schedules, the fused batched sampler step
(DDPM, DDIM, Analytic-DPM, probability-flow ODE), a Heun helper, the full sampling loop, the
Analytic-DPM toolkit and a diffusers-compatible scheduler."""
from .analytic import estimate_gamma, even_trajectory, optimal_trajectory, optimal_variance, step_costs
from .sample import SAMPLE_METHODS, sample
from .schedule import NoiseSchedule
from .scheduler import AnalyticDPMScheduler, SchedulerOutput
from .step import METHODS, PREDICTIONS, heun_step, sampler_step

__all__ = ["METHODS", "PREDICTIONS", "SAMPLE_METHODS", "AnalyticDPMScheduler", "NoiseSchedule", "SchedulerOutput",
           "estimate_gamma", "even_trajectory", "heun_step", "optimal_trajectory", "optimal_variance", "sample",
           "sampler_step", "step_costs"]
