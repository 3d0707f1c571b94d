"""Diffusion sampling (docs/diffusion.md): noise schedules, the fused batched sampler step
(DDPM, DDIM, Analytic-DPM, probability-flow ODE), a Heun helper, the full sampling loop, the
Analytic-DPM toolkit and a diffusers-compatible scheduler.

AnalyticDPMScheduler and SchedulerOutput are resolved on first use: with diffusers installed they are
fastnotes.integrations.diffusers' (a diffusers SchedulerMixin + ConfigMixin that saves and loads),
else fastnotes.diffusion.scheduler's (samples the same, cannot be saved)."""
from .analytic import estimate_gamma, even_trajectory, optimal_trajectory, optimal_variance, step_costs
from .sample import SAMPLE_METHODS, sample
from .schedule import NoiseSchedule
from .step import METHODS, PREDICTIONS, heun_step, sampler_step

__all__ = ["METHODS", "PREDICTIONS", "SAMPLE_METHODS", "AnalyticDPMScheduler", "NoiseSchedule", "SchedulerOutput",
           "estimate_gamma", "even_trajectory", "heun_step", "optimal_trajectory", "optimal_variance", "sample",
           "sampler_step", "step_costs"]


def __getattr__(name):
    if name not in ("AnalyticDPMScheduler", "SchedulerOutput"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from ..integrations import diffusers as _adapter
        found = {"AnalyticDPMScheduler": _adapter.AnalyticDPMScheduler,
                 "SchedulerOutput": _adapter.AnalyticDPMSchedulerOutput}
    except ImportError:
        from . import scheduler as _plain
        found = {"AnalyticDPMScheduler": _plain.AnalyticDPMScheduler, "SchedulerOutput": _plain.SchedulerOutput}
    globals().update(found)
    return found[name]
