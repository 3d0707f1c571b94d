"""AnalyticDPMScheduler: the fused sampler step behind diffusers' scheduler interface, so Analytic-DPM
(and DDPM/DDIM) plug into diffusers pipelines. diffusers itself is not needed.

Index conventions: diffusers numbers the noisy timesteps 0..N-1 and the model is called with those;
fastnotes numbers them 1..N (index 0 is clean data). The scheduler's public `timesteps` and the
`timestep` argument of `step` are in diffusers' numbering; the gamma table is in ours ([N + 1],
G_0 = 0): estimate it with `estimate_gamma(lambda x, t: unet(x, t - 1).sample, data, scheduler.schedule)`.
"""
import math
import types

import numpy as np
import torch

from .analytic import even_trajectory, optimal_trajectory
from .schedule import NoiseSchedule
from .step import sampler_step

_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_METHODS = ("analytic-ddpm", "analytic-ddim", "ddpm", "ddpm-large", "ddim")


class SchedulerOutput:
    """What `step` returns: prev_sample, and pred_original_sample (x0_hat, clipped like the step),
    computed only when read."""

    def __init__(self, prev_sample, original):
        self.prev_sample = prev_sample
        self._original = original

    @property
    def pred_original_sample(self):
        if callable(self._original):
            self._original = self._original()
        return self._original

    def to_tuple(self):
        return self.prev_sample, self.pred_original_sample

    def __getitem__(self, i):
        return self.to_tuple()[i]


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas):
    """float64 betas as diffusers defines its schedules (computed in float64 here)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    n = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"AnalyticDPMScheduler: beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', "
                     f"got {beta_schedule!r}")


class AnalyticDPMScheduler:
    """A diffusers-style scheduler running fastnotes.diffusion.sampler_step.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule,
            as in diffusers' DDPMScheduler ('linear' | 'scaled_linear' | 'squaredcos_cap_v2').
        method: 'analytic-ddpm' (default), 'analytic-ddim', 'ddpm' (beta-tilde variance),
            'ddpm-large' (beta variance) or 'ddim'.
        eta: DDIM's eta (ddim, analytic-ddim).
        gamma: the analytic methods' G_t table, float64 [N + 1] (see the module docstring) or one
            number; can also be set later as `scheduler.gamma`.
        prediction_type: 'epsilon' | 'sample' | 'v_prediction'.
        clip_sample, clip_sample_range: clamp x0_hat to [-range, range] (the analytic variance's
            covariance bound uses the same range).
        trajectory: 'even' (Analytic-DPM's ET), 'optimal' (the DP trajectory; needs gamma, DDPM type)
            or 'leading' (diffusers' default spacing: t = 0, N//K, 2 N//K, ... in its numbering).

    Use: `scheduler.set_timesteps(K)`, then for t in scheduler.timesteps:
    `sample = scheduler.step(model(sample, t), t, sample, generator=g).prev_sample`.
    `AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=...)` takes over a diffusers
    pipeline's schedule.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, method="analytic-ddpm", eta=0.0, gamma=None, prediction_type="epsilon",
                 clip_sample=True, clip_sample_range=1.0, trajectory="even"):
        if method not in _METHODS:
            raise ValueError(f"AnalyticDPMScheduler: method must be one of {_METHODS}, got {method!r}")
        if prediction_type not in _PREDICTIONS:
            raise ValueError(f"AnalyticDPMScheduler: prediction_type must be one of {tuple(_PREDICTIONS)}, "
                             f"got {prediction_type!r}")
        if trajectory not in ("even", "optimal", "leading"):
            raise ValueError(f"AnalyticDPMScheduler: trajectory must be 'even', 'optimal' or 'leading', "
                             f"got {trajectory!r}")
        if trajectory == "optimal" and method != "analytic-ddpm":
            raise ValueError("AnalyticDPMScheduler: the optimal trajectory is defined for analytic-ddpm only")
        if not (isinstance(clip_sample_range, (int, float)) and clip_sample_range > 0):
            raise ValueError(f"AnalyticDPMScheduler: clip_sample_range must be > 0, got {clip_sample_range!r}")
        self.config = types.SimpleNamespace(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, method=method, eta=eta,
            prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
            trajectory=trajectory)
        self.schedule = NoiseSchedule(betas=_betas(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                   trained_betas))
        self.gamma = gamma
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self._previous = {}

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a diffusers scheduler config (or a dict): the training schedule, prediction
        type and clipping carry over; `overrides` set the rest (method, gamma, ...)."""
        config = dict(config)
        known = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "method", "eta",
                 "prediction_type", "clip_sample", "clip_sample_range", "trajectory")
        kwargs = {k: config[k] for k in known if k in config}
        kwargs.update(overrides)
        return cls(**kwargs)

    def __len__(self):
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps, device=None):
        """Choose K = num_inference_steps timesteps (diffusers numbering, descending) by the configured
        trajectory; the last step goes to clean data."""
        n = self.schedule.num_steps
        if not (isinstance(num_inference_steps, int) and 1 <= num_inference_steps <= n):
            raise ValueError(f"set_timesteps: num_inference_steps must be an int in [1, {n}], "
                             f"got {num_inference_steps!r}")
        k = num_inference_steps
        if self.config.trajectory == "leading":
            steps = [i * (n // k) + 1 for i in range(k)]
        elif k == 1:
            steps = [n]
        elif self.config.trajectory == "optimal":
            steps = optimal_trajectory(self.schedule, self._gamma_or_raise(), k)[0]
        else:
            steps = even_trajectory(n, k)
        self.num_inference_steps = k
        self._previous = dict(zip(steps, [0] + steps[:-1]))
        self.timesteps = torch.tensor([t - 1 for t in reversed(steps)], dtype=torch.int64, device=device)

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _gamma_or_raise(self):
        if self.gamma is None:
            raise ValueError(f"AnalyticDPMScheduler: method {self.config.method!r} needs gamma (G_t = "
                             "E||eps_theta(x_t, t)||^2 / d, see fastnotes.diffusion.estimate_gamma)")
        return self.gamma

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, variance_noise=None):
        """One step from `timestep` (diffusers numbering, one of self.timesteps) to the previous one."""
        if self.num_inference_steps is None:
            raise ValueError("AnalyticDPMScheduler.step: call set_timesteps first")
        t = int(timestep) + 1
        if t not in self._previous:
            raise ValueError(f"AnalyticDPMScheduler.step: timestep {int(timestep)} is not one of this scheduler's "
                             "timesteps (see set_timesteps)")
        s = self._previous[t]
        method = self.config.method
        gamma = self._gamma_or_raise() if method.startswith("analytic") else None
        clip = (-self.config.clip_sample_range, self.config.clip_sample_range) if self.config.clip_sample else False
        noise = variance_noise
        if noise is None and generator is not None and generator.device.type != "cpu":
            noise = torch.randn(sample.shape, generator=generator, device=generator.device, dtype=sample.dtype)
            generator = None
        eta = self.config.eta if method in ("ddim", "analytic-ddim") else 0.0
        prediction = _PREDICTIONS[self.config.prediction_type]
        prev = sampler_step(sample, model_output, t, s, self.schedule, method=method, eta=eta,
                            prediction=prediction, gamma=gamma, clip_denoised=clip, noise=noise,
                            generator=generator)
        output = SchedulerOutput(prev, lambda: self._x0_hat(sample, model_output, t, prediction, clip))
        return output if return_dict else output.to_tuple()

    def _x0_hat(self, x, m, t, prediction, clip):
        logab = float(self.schedule.log_alphas_cumprod[t])
        a, sg = math.exp(0.5 * logab), math.sqrt(-math.expm1(logab))
        x0 = {"eps": lambda: (x - sg * m) / a, "x0": lambda: m, "v": lambda: a * x - sg * m}[prediction]()
        return x0.clamp(*clip) if clip else x0

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise at diffusers timesteps [B] (the forward process)."""
        logab = self.schedule.log_alphas_cumprod_on(original_samples.device)[timesteps.long() + 1]
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = torch.exp(0.5 * logab).to(original_samples.dtype).reshape(shape)
        sg = torch.sqrt(-torch.expm1(logab)).to(original_samples.dtype).reshape(shape)
        return a * original_samples + sg * noise
