"""The full reverse-diffusion loop on top of the fused sampler step."""
import torch

from .analytic import _tqdm, even_trajectory
from .schedule import NoiseSchedule
from .step import METHODS, heun_step, sampler_step

SAMPLE_METHODS = METHODS + ("heun",)


def _trajectory(timesteps, num_steps):
    """An increasing list of timesteps in [1, N] from an int K (the even trajectory) or a sequence."""
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        return even_trajectory(num_steps, timesteps) if timesteps >= 2 else [num_steps]
    try:
        steps = [int(t) for t in timesteps]
    except (TypeError, ValueError):
        raise TypeError("sample: timesteps must be an int K or a sequence of ints") from None
    if not steps or any(not 1 <= t <= num_steps for t in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"sample: timesteps must be a non-empty increasing sequence in [1, {num_steps}], got {steps}")
    return steps


@torch.no_grad()
def sample(model, shape, schedule, timesteps, method, *, eta=0.0, prediction="eps", gamma=None, clip_denoised=None,
           x_T=None, generator=None, device=None, dtype=torch.float32, progress=True):
    """Draw samples by running the reverse process from t = tau_K down to 0, one fused step per node.

    Args:
        model: model(x, t) -> the prediction of kind `prediction` ('eps' | 'x0' | 'v'), with t an int64
            tensor [B] of timesteps in 1..N (our index: add 1 to a diffusers timestep, see
            AnalyticDPMScheduler for diffusers models).
        shape: [B, ...] of the samples. schedule: a NoiseSchedule.
        timesteps: an int K (the even trajectory of K nodes from 1 to N, Analytic-DPM's ET) or an
            increasing sequence tau_1 < ... < tau_K in [1, N] (e.g. optimal_trajectory(...)[0]);
            the last step goes from tau_1 to 0.
        method: a sampler_step method ('ddpm', 'ddpm-large', 'ddim', 'analytic-ddpm', 'analytic-ddim',
            'ode-euler') or 'heun' (second-order probability-flow ODE, two model calls per step).
        eta, prediction, gamma, clip_denoised: as in sampler_step.
        x_T: the starting noise (default: standard normal from `generator`).
        generator: a CPU torch.Generator seeding x_T and every step's noise (reproducible).
        progress: show a tqdm progress bar when tqdm is installed.

    Returns the samples x_0, [B, ...] in `dtype` on `device`.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"sample: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if method not in SAMPLE_METHODS:
        raise ValueError(f"sample: method must be one of {SAMPLE_METHODS}, got {method!r}")
    steps = _trajectory(timesteps, schedule.num_steps)
    if x_T is None:
        x = torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"sample: x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
        x = x_T.to(device=device or x_T.device, dtype=dtype).clone()
    batch = x.shape[0]
    pairs = list(zip(reversed(steps), list(reversed(steps))[1:] + [0]))
    if progress and _tqdm is not None:
        pairs = _tqdm(pairs, desc=f"sample ({method})")
    for t, s in pairs:
        if method == "heun":
            x = heun_step(model, x, t, s, schedule, prediction=prediction)
        else:
            t_batch = torch.full((batch,), t, dtype=torch.int64, device=x.device)
            x = sampler_step(x, model(x, t_batch), t, s, schedule, method=method, eta=eta, prediction=prediction,
                             gamma=gamma, clip_denoised=clip_denoised, generator=generator, out=x)
    return x
