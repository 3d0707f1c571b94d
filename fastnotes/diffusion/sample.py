"""The full reverse-diffusion loop on top of the fused sampler step."""
import torch

from .analytic import _tqdm, even_trajectory
from .schedule import NoiseSchedule
from .step import METHODS, heun_step, noise_variance_cap, sampler_step, shares_memory

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
           clip_pixel=None, clip_sigma_steps=None, x_T=None, generator=None, device=None, dtype=torch.float32,
           progress=True):
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
        clip_pixel: None (off) or y > 0: Analytic-DPM's sampling-time noise clip (sampler_step's
            clip_pixel: noise std <= y (2/255) sqrt(pi/2)) on the last `clip_sigma_steps` noisy
            steps, those into tau_1, ..., tau_k (default k = 1: the step into tau_1, as the paper's
            clip_sigma_idx = 1 for all its FID results; y = 2 for Analytic-DDPM on CIFAR10-LS and
            CelebA, 1 otherwise). Not for the ODE methods (no noise).
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
    if clip_sigma_steps is not None and clip_pixel is None:
        raise ValueError("sample: clip_sigma_steps chooses the steps clip_pixel applies to; give clip_pixel too")
    noise_variance_cap(clip_pixel, method, op="sample")  # checks clip_pixel before any model call
    clip_steps = 1 if clip_sigma_steps is None else clip_sigma_steps
    if isinstance(clip_steps, bool) or not isinstance(clip_steps, int) or clip_steps < 1:
        raise ValueError(f"sample: clip_sigma_steps must be an int >= 1, got {clip_sigma_steps!r}")
    # the paper's rule: clip where the target s is one of tau_1..tau_k (s = 0 adds no noise anyway)
    last_clipped = steps[min(clip_steps, len(steps)) - 1]
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
            output = model(x, t_batch)
            x = sampler_step(x, output, t, s, schedule, method=method, eta=eta, prediction=prediction, gamma=gamma,
                             clip_denoised=clip_denoised, clip_pixel=clip_pixel if 0 < s <= last_clipped else None,
                             generator=generator, out=None if shares_memory(output, x) else x)
    return x
