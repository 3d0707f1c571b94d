"""fastnotes.diffusion.AnalyticDPMScheduler as a first-class diffusers scheduler.

The class here is fastnotes.diffusion.scheduler's scheduler (same arguments, same steps) plus
diffusers' SchedulerMixin + ConfigMixin: `save_pretrained` / `save_config` / `from_pretrained` /
`from_config` (of its own config or of any DDPMScheduler / DDIMScheduler config: every key is
honoured or refused with an error naming it), `compatibles`, and diffusers' BaseOutput from `step`.
The gamma table is a config key, so it is saved with the scheduler and with a pipeline.
With diffusers installed, fastnotes.diffusion.AnalyticDPMScheduler is this class.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput
except ImportError as error:  # pragma: no cover - exercised without diffusers
    raise ImportError("fastnotes.integrations.diffusers needs diffusers (pip install 'fastnotes[diffusers]'). "
                      "Without it, fastnotes.diffusion.AnalyticDPMScheduler still samples but cannot "
                      "be saved or loaded.") from error

from ..diffusion import scheduler as _plain

__all__ = ["AnalyticDPMScheduler", "AnalyticDPMSchedulerOutput"]


@dataclass
class AnalyticDPMSchedulerOutput(BaseOutput):
    """What `step` returns: prev_sample (x at the previous timestep) and pred_original_sample
    (x0_hat, clipped like the step), as DDIMSchedulerOutput / DDPMSchedulerOutput."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class AnalyticDPMScheduler(_plain._AnalyticDPMCore, SchedulerMixin, ConfigMixin):
    __doc__ = _plain.AnalyticDPMScheduler.__doc__.split("\n\n", 1)[0] + """ (the diffusers SchedulerMixin +
    ConfigMixin class: save_pretrained / from_pretrained / from_config; gamma is saved in the config).

""" + _plain.AnalyticDPMScheduler.__doc__.split("\n\n", 1)[1]

    config_name = "scheduler_config.json"
    _compatibles: ClassVar[list] = ["DDPMScheduler", "DDIMScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, method: str = "analytic-ddpm", eta: float = 0.0,
                 gamma=None, prediction_type: str = "epsilon", clip_sample: bool = True,
                 clip_sample_range: float = 1.0, timestep_spacing: str = "even", steps_offset: int = 0,
                 set_alpha_to_one: bool = True, variance_type=None, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 rescale_betas_zero_snr: bool = False, noise_source: str = "kernel", clip_pixel=None,
                 clip_sigma_steps: int = 1):
        if isinstance(trained_betas, torch.Tensor):  # keep the config JSON-serialisable
            self.register_to_config(trained_betas=trained_betas.detach().cpu().double().tolist())
        self._setup(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, method, eta, gamma,
                    prediction_type, clip_sample, clip_sample_range, timestep_spacing, steps_offset,
                    set_alpha_to_one, variance_type, thresholding, dynamic_thresholding_ratio, sample_max_value,
                    rescale_betas_zero_snr, noise_source, clip_pixel, clip_sigma_steps)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """ConfigMixin.from_config of this scheduler's config or of a DDPMScheduler / DDIMScheduler one;
        config keys this scheduler does not know raise a ValueError naming them (diffusers would drop
        them); `kwargs` override keys (method, gamma, ...)."""
        if config is not None:
            # diffusers drops the keys a scheduler was built with by default (_use_default_values), so that the
            # new class's defaults apply; here every value of the source config is honoured as it is (a default
            # DDPMScheduler's 'leading' spacing stays 'leading')
            config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
        keys = set(config) if config is not None else set()
        _plain.check_config_keys(cls.__name__, keys | set(kwargs))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _record_gamma(self, table):
        value = table.tolist() if isinstance(table, torch.Tensor) else table
        self.register_to_config(gamma=value)

    def _output(self, prev, x0, return_dict):
        x0 = x0() if callable(x0) else x0
        if not return_dict:
            return prev, x0
        return AnalyticDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
