"""AnalyticDPMScheduler: the fused sampler step behind diffusers' scheduler interface, so Analytic-DPM
(and DDPM/DDIM) plug into diffusers pipelines. diffusers itself is not needed.

Index conventions: diffusers numbers the noisy timesteps 0..N-1 and the model is called with those;
fastnotes numbers them 1..N (index 0 is clean data). The scheduler's public `timesteps` and the
`timestep` argument of `step` are in diffusers' numbering; the gamma table is in ours ([N + 1],
G_0 = 0): estimate it with `estimate_gamma(lambda x, t: unet(x, t - 1).sample, data, scheduler.schedule)`.

This module's class needs no diffusers. With diffusers installed, `fastnotes.diffusion.AnalyticDPMScheduler`
is fastnotes.integrations.diffusers.AnalyticDPMScheduler: the same scheduler as a diffusers
SchedulerMixin + ConfigMixin (save_pretrained / from_pretrained / from_config, pipelines save and load).
"""
import itertools
import math
import types

import numpy as np
import torch

from .analytic import estimate_gamma, even_trajectory, optimal_trajectory
from .schedule import NoiseSchedule
from .step import check_zero_snr, noise_variance_cap, sampler_step

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


def _cosine_abar(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_abar(u):
    lmb = -0.5 * math.copysign(1, 0.5 - u) * math.log(1 - 2 * math.fabs(0.5 - u) + 1e-6)
    return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))


_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")


def _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas):
    """float64 betas as diffusers defines its schedules (computed in float64 here)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    n = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    if beta_schedule == "sigmoid":  # GeoDiff's (DDPMScheduler only)
        return 1 / (1 + np.exp(-np.linspace(-6, 6, n))) * (beta_end - beta_start) + beta_start
    if beta_schedule in ("squaredcos_cap_v2", "laplace"):  # diffusers' betas_for_alpha_bar, max_beta 0.999
        abar = _cosine_abar if beta_schedule == "squaredcos_cap_v2" else _laplace_abar
        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"AnalyticDPMScheduler: beta_schedule must be one of {_BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023, Algorithm 1 (diffusers' rescale_zero_terminal_snr, in float64): shift and
    scale sqrt(alphas_cumprod) so that its last entry is 0 and its first unchanged. The last beta
    is then exactly 1 (alphas_cumprod[N] = 0)."""
    root = np.sqrt(np.cumprod(1 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    abar = root**2
    return 1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


_SPACINGS = ("even", "optimal", "leading", "trailing", "linspace")
_DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
_NOISE_SOURCES = ("kernel", "diffusers")
_VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large")
_DDIM_FAMILY = ("ddim", "analytic-ddim")
_INSTALL = "needs diffusers (pip install 'fastnotes[diffusers]')"


def diffusers_randn(shape, generator, device, dtype):
    """Standard normal noise drawn exactly as diffusers' randn_tensor draws it: one generator, or a
    list of one per sample (each draws its sample's [1, ...] slice); a CPU generator for a tensor on
    another device draws on the CPU and the result is moved."""
    device = torch.device(device)
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"AnalyticDPMScheduler.step: generator is a list of {len(generator)} generators for a "
                             f"batch of {shape[0]} samples (give one per sample)")
        rand_device = "cpu" if generator[0].device.type == "cpu" else device
        noise = torch.cat([torch.randn((1,) + shape[1:], generator=g, device=rand_device, dtype=dtype)
                           for g in generator])
    else:
        rand_device = "cpu" if generator is not None and generator.device.type == "cpu" else device
        noise = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype)
    return noise.to(device)


def _is_generator(value):
    return isinstance(value, torch.Generator) or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(g, torch.Generator) for g in value))


class _AnalyticDPMCore:
    """What the plain and the diffusers scheduler share (see AnalyticDPMScheduler for the arguments)."""

    order = 1
    init_noise_sigma = 1.0

    def _setup(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, method, eta, gamma,
               prediction_type, clip_sample, clip_sample_range, timestep_spacing, steps_offset, set_alpha_to_one,
               variance_type, thresholding, dynamic_thresholding_ratio, sample_max_value, rescale_betas_zero_snr,
               noise_source, clip_pixel, clip_sigma_steps):
        name = "AnalyticDPMScheduler"
        if method not in _METHODS:
            raise ValueError(f"{name}: method must be one of {_METHODS}, got {method!r}")
        if prediction_type not in _PREDICTIONS:
            raise ValueError(f"{name}: prediction_type must be one of {tuple(_PREDICTIONS)}, got {prediction_type!r}")
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"{name}: timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        if timestep_spacing == "optimal" and method != "analytic-ddpm":
            raise ValueError(f"{name}: the optimal trajectory (timestep_spacing='optimal') is defined for "
                             "analytic-ddpm only")
        if not (isinstance(clip_sample_range, (int, float)) and not isinstance(clip_sample_range, bool)
                and clip_sample_range > 0):
            raise ValueError(f"{name}: clip_sample_range must be > 0, got {clip_sample_range!r}")
        if not isinstance(clip_sample, bool):
            raise ValueError(f"{name}: clip_sample must be a bool, got {clip_sample!r}")
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"{name}: eta must be a finite number >= 0, got {eta!r}")
        if eta != 0 and method not in _DDIM_FAMILY:
            raise ValueError(f"{name}: eta is a parameter of ddim and analytic-ddim, not of {method!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"{name}: steps_offset must be an int >= 0, got {steps_offset!r}")
        if steps_offset and timestep_spacing not in _DIFFUSERS_SPACINGS:
            raise ValueError(f"{name}: steps_offset={steps_offset} applies to diffusers' timestep spacings "
                             f"{_DIFFUSERS_SPACINGS} (as in diffusers, it shifts 'leading' only), not to "
                             f"timestep_spacing={timestep_spacing!r}")
        if not isinstance(set_alpha_to_one, bool):
            raise ValueError(f"{name}: set_alpha_to_one must be a bool, got {set_alpha_to_one!r}")
        if variance_type not in _VARIANCE_TYPES:
            raise ValueError(f"{name}: variance_type {variance_type!r} is not supported; use None, 'fixed_small', "
                             "'fixed_small_log' (the same noise in diffusers) or 'fixed_large' (learned variances "
                             "are not implemented; diffusers' own 'fixed_large_log' step takes the square root of a "
                             "negative log)")
        if variance_type in ("fixed_small", "fixed_small_log") and method == "ddpm-large":
            raise ValueError(f"{name}: variance_type={variance_type!r} contradicts method='ddpm-large' (use "
                             "method='ddpm')")
        if not isinstance(thresholding, bool):
            raise ValueError(f"{name}: thresholding must be a bool, got {thresholding!r}")
        for key, value in (("dynamic_thresholding_ratio", dynamic_thresholding_ratio),
                           ("sample_max_value", sample_max_value)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: {key} must be a number, got {value!r}")
        if thresholding and not 0 <= dynamic_thresholding_ratio <= 1:
            raise ValueError(f"{name}: dynamic_thresholding_ratio must lie in [0, 1] (a quantile), "
                             f"got {dynamic_thresholding_ratio!r}")
        if thresholding and not (math.isfinite(sample_max_value) and sample_max_value > 0):
            raise ValueError(f"{name}: sample_max_value must be finite and > 0, got {sample_max_value!r}")
        if not isinstance(rescale_betas_zero_snr, bool):
            raise ValueError(f"{name}: rescale_betas_zero_snr must be a bool, got {rescale_betas_zero_snr!r}")
        if rescale_betas_zero_snr and (method.startswith("analytic") or timestep_spacing == "optimal"):
            raise ValueError(f"{name}: rescale_betas_zero_snr=True makes alphas_cumprod[N - 1] = 0, where the "
                             f"Analytic-DPM variance (1 - ab_t)/ab_t (1 - G_t) and its optimal trajectory are undefined; "
                             f"method {method!r} / timestep_spacing {timestep_spacing!r} cannot use it (use 'ddpm' "
                             "or 'ddim', with prediction_type 'v_prediction' or 'sample')")
        if noise_source not in _NOISE_SOURCES:
            raise ValueError(f"{name}: noise_source must be one of {_NOISE_SOURCES}, got {noise_source!r}")
        noise_variance_cap(clip_pixel, method, op=name)  # checks clip_pixel
        if isinstance(clip_sigma_steps, bool) or not isinstance(clip_sigma_steps, int) or clip_sigma_steps < 1:
            raise ValueError(f"{name}: clip_sigma_steps must be an int >= 1, got {clip_sigma_steps!r}")
        betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.schedule = NoiseSchedule(betas=betas, zero_terminal_snr=rescale_betas_zero_snr)
        self._method = "ddpm-large" if method == "ddpm" and variance_type == "fixed_large" else method
        self._gamma = None
        self.gamma = gamma
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    # ---- gamma ----------------------------------------------------------------------------------

    @property
    def gamma(self):
        """Analytic methods' G_t table (float64 [N + 1], fastnotes numbering) or one number, or None."""
        return self._gamma

    @gamma.setter
    def gamma(self, value):
        n = self.schedule.num_steps
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AnalyticDPMScheduler: gamma must be finite and >= 0, got {value!r}")
            table = None if value is None else float(value)
        else:
            try:
                table = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                                                   dtype=np.float64))
            except (TypeError, ValueError):
                raise TypeError(f"AnalyticDPMScheduler: gamma must be None, a number or a [{n + 1}] table, got "
                                f"{type(value).__name__}") from None
            if table.shape != (n + 1,):
                raise ValueError(f"AnalyticDPMScheduler: gamma must be a number or have shape [{n + 1}] (G_t for "
                                 f"t = 0..N), got {tuple(table.shape)}")
            if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
                raise ValueError("AnalyticDPMScheduler: gamma must be finite and >= 0")
        self._gamma = table
        self._record_gamma(table)

    def _record_gamma(self, table):
        """Hook: the diffusers class writes gamma into its config so that it is saved."""

    def _gamma_or_raise(self):
        if self._gamma is None:
            raise ValueError(f"AnalyticDPMScheduler: method {self.config.method!r} needs gamma (G_t = "
                             "E||eps_theta(x_t, t)||^2 / d, see fastnotes.diffusion.estimate_gamma)")
        return self._gamma

    def __len__(self):
        return self.config.num_train_timesteps

    # ---- timesteps ----------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """Choose the timesteps (diffusers numbering, descending): K = num_inference_steps of them by
        the configured timestep_spacing, or exactly `timesteps` (a descending list in [0, N - 1])."""
        n = self.schedule.num_steps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: give exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            values = [int(v) for v in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
            if not values:
                raise ValueError("set_timesteps: timesteps must not be empty")
            if any(b >= a for a, b in itertools.pairwise(values)):
                raise ValueError(f"set_timesteps: timesteps must be strictly descending, got {values}")
            if values[0] >= n or values[-1] < 0:
                raise ValueError(f"set_timesteps: timesteps must lie in [0, {n - 1}], got {values}")
            self.custom_timesteps = True
            self.num_inference_steps = len(values)
            self.timesteps = torch.tensor(values, dtype=torch.int64, device=device)
            return
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or not (
                1 <= num_inference_steps <= n):
            raise ValueError(f"set_timesteps: num_inference_steps must be an int in [1, {n}], "
                             f"got {num_inference_steps!r}")
        k = int(num_inference_steps)
        spacing = self.config.timestep_spacing
        if spacing == "leading":
            values = [i * (n // k) + self.config.steps_offset for i in reversed(range(k))]
        elif spacing == "trailing":
            values = (np.round(np.arange(n, 0, -n / k)).astype(np.int64) - 1).tolist()
        elif spacing == "linspace":
            values = np.linspace(0, n - 1, k).round()[::-1].astype(np.int64).tolist()
        elif k == 1:
            values = [n - 1]
        elif spacing == "optimal":
            values = self.optimal_timesteps(k)
        else:
            values = [t - 1 for t in reversed(even_trajectory(n, k))]
        self.custom_timesteps = False
        self.num_inference_steps = k
        self.timesteps = torch.tensor(values, dtype=torch.int64, device=device)

    def previous_timestep(self, timestep):
        """The timestep (diffusers numbering) a step from `timestep` goes to; -1 means clean data. As
        DDIMScheduler for ddim / analytic-ddim with diffusers' spacings (timestep - N // K), else the
        next entry of `timesteps`."""
        if self.num_inference_steps is None:
            raise ValueError("AnalyticDPMScheduler: call set_timesteps first")
        t = int(timestep)
        listed = self.timesteps.tolist()
        if t not in listed:
            raise ValueError(f"AnalyticDPMScheduler.step: timestep {t} is not one of this scheduler's timesteps "
                             "(see set_timesteps)")
        if (self._method in _DDIM_FAMILY and self.config.timestep_spacing in _DIFFUSERS_SPACINGS
                and not self.custom_timesteps):
            return t - self.config.num_train_timesteps // self.num_inference_steps
        i = listed.index(t)
        return listed[i + 1] if i + 1 < len(listed) else -1

    def scale_model_input(self, sample, timestep=None):
        return sample

    # ---- the step --------------------------------------------------------------------------------

    def step(self, model_output, timestep, sample, eta=None, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """One step from `timestep` (diffusers numbering, one of self.timesteps) to previous_timestep.

        Takes what DDPMScheduler.step and DDIMScheduler.step take: eta (ddim methods; None = the
        config's; a generator in this place is taken as DDPMScheduler's positional generator),
        use_clipped_model_output, generator (a torch.Generator or a list of one per sample),
        variance_noise (the noise itself). Noise: noise_source='kernel' draws it inside the fused
        kernel (a CPU generator seeds it); 'diffusers' draws it as diffusers' schedulers do, so a
        seed gives diffusers' samples.
        """
        if _is_generator(eta):
            if generator is not None:
                raise ValueError("AnalyticDPMScheduler.step: got a generator as the 4th positional argument (eta) "
                                 "and generator=; give it once")
            eta, generator = None, eta
        if self.num_inference_steps is None:
            raise ValueError("AnalyticDPMScheduler.step: call set_timesteps first")
        method = self._method
        if eta is None:
            eta = self.config.eta
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"AnalyticDPMScheduler.step: eta must be a finite number >= 0, got {eta!r}")
        if eta != 0 and method not in _DDIM_FAMILY:
            raise ValueError(f"AnalyticDPMScheduler.step: eta is a parameter of ddim and analytic-ddim, not of "
                             f"{method!r}")
        if variance_noise is not None and generator is not None:
            raise ValueError("AnalyticDPMScheduler.step: give generator or variance_noise, not both")
        if generator is not None and not _is_generator(generator):
            raise TypeError(f"AnalyticDPMScheduler.step: generator must be a torch.Generator or a list of them, got "
                            f"{type(generator).__name__}")
        t_d = int(timestep)
        prev_d = self.previous_timestep(t_d)
        t = t_d + 1
        s = prev_d + 1 if prev_d >= 0 else (0 if self.config.set_alpha_to_one else 1)
        prediction = _PREDICTIONS[self.config.prediction_type]
        check_zero_snr(self.schedule, np.array([t]), method, prediction, op="AnalyticDPMScheduler.step")
        gamma = self._gamma_or_raise() if method.startswith("analytic") else None
        r = self.config.clip_sample_range
        if self.config.thresholding:
            # dynamic thresholding needs a per-sample quantile of x0_hat: computed here in torch, then the
            # thresholded x0_hat (in [-1, 1]) goes to the fused step as an x0 prediction; the kernel's [-1, 1]
            # clamp is a no-op on it and bounds the analytic covariance by R = 1
            x0_raw = self._x0_hat(sample, model_output, t, prediction, False)
            x0, clip = self._threshold(x0_raw), (-1.0, 1.0)
        else:
            clip = (-r, r) if self.config.clip_sample else False
            x0 = lambda: self._x0_hat(sample, model_output, t, prediction, clip)  # computed when read
        eps_m, eps_prediction = model_output, prediction  # what the DDIM direction's eps_hat comes from
        if use_clipped_model_output and clip:  # eps re-derived from the clipped / thresholded x0_hat (GLIDE; DDIM)
            x0 = x0() if callable(x0) else x0
            eps_m, eps_prediction = x0, "x0"
        if s >= t:
            x0 = x0() if callable(x0) else x0  # only t = 1 to alphas_cumprod[0] (set_alpha_to_one=False): no noise, x0_hat re-noised
            logab = float(self.schedule.log_alphas_cumprod[t])
            a, sg = math.exp(0.5 * logab), math.sqrt(-math.expm1(logab))
            prev = a * x0 + sg * self._eps_hat(sample, eps_m, t, eps_prediction)
            return self._output(prev, x0, return_dict)
        stochastic = not (method == "ddim" and eta == 0)
        noise = variance_noise
        if noise is None and stochastic:
            if self.config.noise_source == "diffusers":
                draws = t_d > 0 if method not in _DDIM_FAMILY else (eta > 0 or method == "analytic-ddim")
                if draws:
                    noise = diffusers_randn(model_output.shape, generator, model_output.device, model_output.dtype)
                    generator = None
            elif isinstance(generator, (list, tuple)) or (generator is not None and generator.device.type != "cpu"):
                noise = diffusers_randn(model_output.shape, generator, model_output.device, model_output.dtype)
                generator = None
        elif noise is not None:
            generator = None
        m, step_prediction = (x0, "x0") if self.config.thresholding else (eps_m, eps_prediction)
        prev = sampler_step(sample, m, t, s, self.schedule, method=method, eta=float(eta) if method in _DDIM_FAMILY
                            else 0.0, prediction=step_prediction, gamma=gamma, clip_denoised=clip, noise=noise,
                            clip_pixel=self._clip_pixel_at(s),
                            generator=generator if isinstance(generator, torch.Generator) else None)
        if self.config.thresholding and method in _DDIM_FAMILY and eps_prediction != "x0":
            # the fused step took eps_hat from the thresholded x0_hat; DDIM's direction uses the model's own:
            # eps_raw - eps_thr = a_t (x0_thr - x0_raw) / sg_t, times the direction's coefficient
            prev = prev.add_(x0 - x0_raw, alpha=self._ddim_direction(t, s, float(eta)))
        return self._output(prev, x0, return_dict)

    def _ddim_direction(self, t, s, eta):
        """DDIM's sqrt(1 - ab_s - eta^2 bt_ts) a_t / sg_t (float64 from the table)."""
        lt, ls = (float(self.schedule.log_alphas_cumprod[i]) for i in (t, s))
        oma_t, oma_s = -math.expm1(lt), -math.expm1(ls)
        bt = -math.expm1(lt - ls) * oma_s / oma_t
        return math.sqrt(max(oma_s - eta * eta * bt, 0.0)) * math.exp(0.5 * lt) / math.sqrt(oma_t)

    def _clip_pixel_at(self, s):
        """The noise clip for a step into s: the config's clip_pixel on the steps into the lowest
        clip_sigma_steps nodes of the trajectory (as fastnotes.diffusion.sample), else None."""
        if self.config.clip_pixel is None or s == 0:
            return None
        nodes = sorted(int(v) + 1 for v in self.timesteps.tolist())
        return self.config.clip_pixel if s <= nodes[min(self.config.clip_sigma_steps, len(nodes)) - 1] else None

    def _threshold(self, x0):
        """diffusers' dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1,
        sample_max_value), x0 -> clamp(x0, -s, s) / s; the quantile in float32 for half inputs."""
        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        level = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        level = torch.clamp(level, min=1, max=self.config.sample_max_value)[:, None]
        return (torch.clamp(flat, -level, level) / level).reshape(x0.shape).to(dtype)

    def _output(self, prev, x0, return_dict):
        if not return_dict:
            return prev, x0() if callable(x0) else x0
        return SchedulerOutput(prev, x0)

    def _x0_hat(self, x, m, t, prediction, clip):
        """x0_hat (clamped to `clip`) in torch: pred_original_sample, which diffusers' output carries
        (one new tensor, updated in place: this is most of a step's cost outside the kernel)."""
        if prediction == "x0":
            return m.clamp(*clip) if clip else m
        logab = float(self.schedule.log_alphas_cumprod[t])
        a, sg = math.exp(0.5 * logab), math.sqrt(-math.expm1(logab))
        x0 = torch.add(x, m, alpha=-sg).div_(a) if prediction == "eps" else torch.mul(x, a).sub_(m, alpha=sg)
        return x0.clamp_(*clip) if clip else x0

    def _eps_hat(self, x, m, t, prediction):
        logab = float(self.schedule.log_alphas_cumprod[t])
        a, sg = math.exp(0.5 * logab), math.sqrt(-math.expm1(logab))
        return {"eps": lambda: m, "x0": lambda: (x - a * m) / sg, "v": lambda: a * m + sg * x}[prediction]()

    def _forward_coefficients(self, like, timesteps):
        """sqrt(ab_t), sqrt(1 - ab_t) at diffusers timesteps [B], shaped to broadcast over `like`."""
        timesteps = torch.as_tensor(timesteps, device=like.device)
        if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
            raise TypeError(f"AnalyticDPMScheduler: timesteps must be integers (diffusers numbering), got "
                            f"{timesteps.dtype}")
        logab = self.schedule.log_alphas_cumprod_on(like.device)[timesteps.long().reshape(-1) + 1]
        shape = (-1,) + (1,) * (like.dim() - 1)
        a = torch.exp(0.5 * logab).to(like.dtype).reshape(shape)
        sg = torch.sqrt(-torch.expm1(logab)).to(like.dtype).reshape(shape)
        return a, sg

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise at diffusers timesteps [B] (the forward process,
        as DDPMScheduler.add_noise; the coefficients in float64, then in the samples' dtype)."""
        a, sg = self._forward_coefficients(original_samples, timesteps)
        return a * original_samples + sg * noise

    def get_velocity(self, sample, noise, timesteps):
        """The v_prediction target v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0 at diffusers timesteps [B]
        (`sample` is x0, as DDPMScheduler.get_velocity)."""
        a, sg = self._forward_coefficients(sample, timesteps)
        return a * noise - sg * sample

    # ---- Analytic-DPM extras ---------------------------------------------------------------------

    def estimate_gamma(self, unet, data, n_samples=100, *, timesteps=None, batch_size=256, seed=None,
                       generator=None, progress=True, group=None):
        """Estimate the analytic methods' G table from a diffusers model and training data, store it
        as `self.gamma` (so save_pretrained saves it) and return it.

        unet: the pipeline's model, called as unet(x_t, t) with diffusers timesteps (a UNet2DModel's
        output `.sample` is taken); its output is converted to an eps prediction by the configured
        prediction_type. data: a tensor [M, ...] of training samples scaled as the model sees them
        (the first n_samples are used) or a callable n -> batch. timesteps: the diffusers timesteps
        to estimate (default all N; others get G = 0, the largest analytic variance the clip
        allows). batch_size, seed, generator, progress (a tqdm bar), group: as
        fastnotes.diffusion.estimate_gamma, which does the work."""
        if self.schedule.zero_terminal_snr:
            raise ValueError("AnalyticDPMScheduler.estimate_gamma: the analytic variance is undefined at zero "
                             "terminal SNR (rescale_betas_zero_snr=True)")
        prediction = _PREDICTIONS[self.config.prediction_type]
        steps = None if timesteps is None else [int(v) + 1 for v in (
            timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]

        def eps_model(x, t):
            out = unet(x, t - 1)
            out = getattr(out, "sample", out)
            if prediction == "eps":
                return out
            a, sg = self._forward_coefficients(x, t - 1)
            return a * out + sg * x if prediction == "v" else (x - a * out) / sg

        table = estimate_gamma(eps_model, data, self.schedule, steps, n_samples, batch_size=batch_size, seed=seed,
                               generator=generator, progress=progress, group=group)
        self.gamma = table
        return table

    def optimal_timesteps(self, num_inference_steps):
        """Analytic-DPM's optimal trajectory of K = num_inference_steps nodes (the DP over the KL
        costs, fastnotes.diffusion.optimal_trajectory, from this scheduler's gamma) as descending
        diffusers timesteps: pass them to set_timesteps(timesteps=...) (any method samples on them;
        the DP itself is the analytic-DDPM cost). timestep_spacing='optimal' does the same in
        set_timesteps(K)."""
        if self.schedule.zero_terminal_snr:
            raise ValueError("AnalyticDPMScheduler.optimal_timesteps: the trajectory's KL costs are undefined at "
                             "zero terminal SNR (rescale_betas_zero_snr=True)")
        k = num_inference_steps
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.schedule.num_steps:
            raise ValueError(f"optimal_timesteps: num_inference_steps must be an int in [1, {self.schedule.num_steps}],"
                             f" got {k!r}")
        if k == 1:
            return [self.schedule.num_steps - 1]
        path, _ = optimal_trajectory(self.schedule, self._gamma_or_raise(), int(k))
        return [t - 1 for t in reversed(path)]


_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, method="analytic-ddpm", eta=0.0, gamma=None, prediction_type="epsilon",
                 clip_sample=True, clip_sample_range=1.0, timestep_spacing="even", steps_offset=0,
                 set_alpha_to_one=True, variance_type=None, thresholding=False, dynamic_thresholding_ratio=0.995,
                 sample_max_value=1.0, rescale_betas_zero_snr=False, noise_source="kernel", clip_pixel=None,
                 clip_sigma_steps=1)
CONFIG_KEYS = tuple(_DEFAULTS)


def check_config_keys(cls_name, keys):
    """Raise naming every key that is neither a config key of the scheduler nor private ('_...')."""
    unknown = sorted(k for k in keys if k not in _DEFAULTS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{cls_name}.from_config: unsupported config key(s) {unknown}; supported: {list(CONFIG_KEYS)}")


class AnalyticDPMScheduler(_AnalyticDPMCore):
    """A diffusers-style scheduler running fastnotes.diffusion.sampler_step (this class needs no
    diffusers; with diffusers installed fastnotes.diffusion exports the diffusers subclass from
    fastnotes.integrations.diffusers, which adds save/load).

    Args (each a config key; DDPMScheduler / DDIMScheduler keys mean what they mean there):
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the training schedule
            ('linear' | 'scaled_linear' | 'squaredcos_cap_v2' | 'sigmoid' | 'laplace').
        method: 'analytic-ddpm' (default), 'analytic-ddim', 'ddpm' (beta-tilde variance),
            'ddpm-large' (beta variance) or 'ddim'.
        eta: DDIM's eta (ddim, analytic-ddim); step(eta=...) overrides it.
        gamma: the analytic methods' G_t table, float64 [N + 1] (see the module docstring) or one
            number; can also be set later as `scheduler.gamma`.
        prediction_type: 'epsilon' | 'sample' | 'v_prediction'.
        clip_sample, clip_sample_range: clamp x0_hat to [-range, range] (the analytic variance's
            covariance bound uses the same range).
        timestep_spacing: 'even' (Analytic-DPM's ET, the default), 'optimal' (the DP trajectory;
            needs gamma, analytic-ddpm), or diffusers' 'leading' | 'trailing' | 'linspace'.
        steps_offset: added to 'leading' timesteps (as diffusers).
        set_alpha_to_one: the final step goes to clean data (True) or to alphas_cumprod[0] (DDIM's False).
        variance_type: None | 'fixed_small' | 'fixed_small_log' | 'fixed_large' (DDPM's; with
            method='ddpm', fixed_large means 'ddpm-large'; the analytic and ddim methods define their
            own variance).
        thresholding, dynamic_thresholding_ratio, sample_max_value: diffusers' dynamic thresholding
            of x0_hat (Imagen; replaces clip_sample): per sample, s = clamp(quantile(|x0_hat|, ratio),
            1, sample_max_value) and x0_hat -> clamp(x0_hat, -s, s) / s. The quantile runs in torch
            before the fused step; the analytic covariance is then bounded with R = 1.
        rescale_betas_zero_snr: diffusers' zero terminal SNR rescaling (alphas_cumprod[N - 1] = 0).
            Not with the analytic methods nor the optimal trajectory (their variance divides by
            ab_t); a step from timestep N - 1 with prediction_type 'epsilon' raises (x0_hat would
            divide by 0): use 'v_prediction' or 'sample', or a spacing that skips N - 1 ('leading').
        noise_source: 'kernel' (in-kernel counter-based noise, the fast default) or 'diffusers'
            (noise drawn as diffusers' schedulers draw it: seed-for-seed equal samples).
        clip_pixel, clip_sigma_steps: Analytic-DPM's sampling-time noise clip (sampler_step's
            clip_pixel: noise std <= clip_pixel (2/255) sqrt(pi/2)) on the steps into the lowest
            clip_sigma_steps noisy nodes of the trajectory (default 1: the step into tau_1, as the
            paper); None (the default) is off.

    Use: `scheduler.set_timesteps(K)`, then for t in scheduler.timesteps:
    `sample = scheduler.step(model(sample, t), t, sample, generator=g).prev_sample`.
    Analytic-DPM: `scheduler.estimate_gamma(unet, images)` fills `gamma` (a progress bar),
    `scheduler.set_timesteps(timesteps=scheduler.optimal_timesteps(K))` samples on the DP trajectory.
    """

    def __init__(self, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, method="analytic-ddpm", eta=0.0, gamma=None, prediction_type="epsilon",
                 clip_sample=True, clip_sample_range=1.0, timestep_spacing="even", steps_offset=0,
                 set_alpha_to_one=True, variance_type=None, thresholding=False, dynamic_thresholding_ratio=0.995,
                 sample_max_value=1.0, rescale_betas_zero_snr=False, noise_source="kernel", clip_pixel=None,
                 clip_sigma_steps=1):
        args = {k: v for k, v in locals().items() if k in _DEFAULTS}
        self.config = types.SimpleNamespace(**args)
        self._setup(**args)

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a diffusers scheduler config (or a dict); `overrides` set keys too (method, gamma, ...).
        Every key must be supported (private '_...' keys are skipped)."""
        config = dict(vars(config) if isinstance(config, types.SimpleNamespace) else config)
        config.update(overrides)
        check_config_keys(cls.__name__, config)
        return cls(**{k: v for k, v in config.items() if k in _DEFAULTS})

    def save_pretrained(self, *args, **kwargs):
        raise ImportError(f"AnalyticDPMScheduler.save_pretrained {_INSTALL}; then fastnotes.diffusion."
                          "AnalyticDPMScheduler is the diffusers ConfigMixin class")

    save_config = save_pretrained

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ImportError(f"AnalyticDPMScheduler.from_pretrained {_INSTALL}")
