"""AnalyticDPMScheduler as a diffusers scheduler (fastnotes.integrations.diffusers): config round
trips, save/load of the scheduler and of a DDPMPipeline, output types, and full loops against
diffusers' DDPMScheduler / DDIMScheduler given the same noise for each config key; every unsupported
key raises. Tolerances: diffusers keeps its tables in float32, we in float64: per-step differences
of a few float32 ulps of values <= ~3, so 1e-4 over a 10-step loop."""
import inspect
import json
import typing

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastnotes.diffusion import AnalyticDPMScheduler, SchedulerOutput
from fastnotes.diffusion import scheduler as plain
from fastnotes.integrations import diffusers as adapter

SHAPE = (2, 3, 4, 4)
ATOL = 1e-4


def model(x, t):
    """A deterministic stand-in for a network: depends on x and t."""
    return 0.8 * torch.tanh(x) + 0.001 * (float(t) % 97) * torch.ones_like(x)


def run(scheduler, k=None, seed=0, timesteps=None, **step_kwargs):
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=gen, **step_kwargs).prev_sample
    return x


def test_the_exported_class_is_the_diffusers_one():
    assert AnalyticDPMScheduler is adapter.AnalyticDPMScheduler
    assert SchedulerOutput is adapter.AnalyticDPMSchedulerOutput
    assert issubclass(AnalyticDPMScheduler, diffusers.SchedulerMixin)
    assert issubclass(AnalyticDPMScheduler, diffusers.ConfigMixin)
    names = {c.__name__ for c in AnalyticDPMScheduler().compatibles}
    assert {"DDPMScheduler", "DDIMScheduler"} <= names


def test_config_round_trips_give_identical_steps(tmp_path):
    gamma = torch.linspace(0, 0.9, 1001, dtype=torch.float64)
    ours = AnalyticDPMScheduler(method="analytic-ddim", eta=0.3, gamma=gamma, beta_schedule="scaled_linear",
                                clip_sample_range=2.0, noise_source="diffusers")
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["method"] == "analytic-ddim" and len(saved["gamma"]) == 1001
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    copied = AnalyticDPMScheduler.from_config(ours.config)
    assert torch.equal(loaded.gamma, gamma)
    expected = run(ours, 8)
    for other in (loaded, copied):
        assert torch.equal(run(other, 8), expected)
    ours.gamma = 0.5  # set later: saved too
    ours.save_config(tmp_path)
    assert AnalyticDPMScheduler.from_pretrained(tmp_path).gamma == 0.5


def test_step_outputs_return_dict_and_tuple():
    s = AnalyticDPMScheduler(method="ddim", eta=0.5, timestep_spacing="leading")
    s.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[1]
    out = s.step(model(x, t), t, x, generator=torch.Generator().manual_seed(1))
    tup = s.step(model(x, t), t, x, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert isinstance(out, diffusers.utils.BaseOutput) and isinstance(tup, tuple)
    assert torch.equal(out["prev_sample"], tup[0]) and torch.equal(out.pred_original_sample, tup[1])
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"]
    # DDPMScheduler's positional generator (4th argument) is taken as the generator
    positional = s.step(model(x, t), t, x, torch.Generator().manual_seed(1))
    assert torch.equal(positional.prev_sample, out.prev_sample)


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def test_a_ddpm_pipeline_with_it_saves_and_loads(tmp_path):
    unet = _tiny_unet()
    scheduler = AnalyticDPMScheduler.from_config(diffusers.DDPMScheduler().config, gamma=0.4)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is AnalyticDPMScheduler
    assert loaded.scheduler.gamma == 0.4 and loaded.scheduler.config.timestep_spacing == "leading"

    def images(p, gens):
        return p(batch_size=2, num_inference_steps=4, output_type="np", generator=gens).images

    for gens in (lambda: torch.Generator().manual_seed(0),
                 lambda: [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]):
        a, b = images(pipe, gens()), images(loaded, gens())
        assert a.shape == (2, 8, 8, 1) and abs(a - b).max() < 1e-6


def test_a_ddim_pipeline_takes_it():
    unet = _tiny_unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=AnalyticDPMScheduler(method="ddim", noise_source="diffusers"))
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=1, num_inference_steps=3, eta=0.5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    ddim = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    ddim.set_progress_bar_config(disable=True)
    ddim.scheduler = diffusers.DDIMScheduler.from_config(ddim.scheduler.config, timestep_spacing="linspace")
    pipe.scheduler = AnalyticDPMScheduler.from_config(ddim.scheduler.config, method="ddim", noise_source="diffusers")
    got = pipe(batch_size=1, num_inference_steps=3, eta=0.5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    expected = ddim(batch_size=1, num_inference_steps=3, eta=0.5, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert abs(got - expected).max() < ATOL


SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
      "set_alpha_to_one": False, "steps_offset": 1}  # Stable Diffusion's DDIM config
SD_DDPM = {k: v for k, v in SD.items() if k != "set_alpha_to_one"}
# dynamic thresholding that acts: the tests' model gives |x0_hat| quantiles well above 1 at large t
THRESHOLD = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
DDPM_CASES = [
    {}, {"steps_offset": 1}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"},
    {"beta_schedule": "scaled_linear"}, {"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "sigmoid"},
    {"beta_schedule": "laplace"}, {"num_train_timesteps": 500, "beta_end": 0.03},
    {"clip_sample_range": 0.5}, {"clip_sample": False}, {"variance_type": "fixed_large"},
    {"variance_type": "fixed_small_log"},
    {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()}, {"prediction_type": "v_prediction"},
    {"prediction_type": "sample", "clip_sample_range": 0.7},
    THRESHOLD, {**THRESHOLD, "prediction_type": "v_prediction", "sample_max_value": 1.5},
    ZERO_SNR, {**ZERO_SNR, **THRESHOLD}, {"rescale_betas_zero_snr": True},  # 'leading' skips t = 999: eps is fine
    {**ZERO_SNR, "prediction_type": "sample", "clip_sample": False},
    SD_DDPM, {**SD_DDPM, "prediction_type": "v_prediction"}, {**SD_DDPM, **ZERO_SNR},
]
DDIM_CASES = [
    ({}, {}), (SD, {}), (SD, {"eta": 0.5}), ({"timestep_spacing": "trailing"}, {"eta": 1.0}),
    ({**SD, "prediction_type": "v_prediction"}, {}),
    ({"timestep_spacing": "linspace", "set_alpha_to_one": False}, {}),
    ({"clip_sample_range": 0.5}, {"eta": 0.5, "use_clipped_model_output": True}),
    ({"steps_offset": 1, "prediction_type": "v_prediction"}, {"eta": 0.3}),
    ({"set_alpha_to_one": False}, {"eta": 0.3}),
    (THRESHOLD, {}), (THRESHOLD, {"eta": 0.5}), (THRESHOLD, {"eta": 0.5, "use_clipped_model_output": True}),
    ({**THRESHOLD, "set_alpha_to_one": False, "prediction_type": "sample"}, {"eta": 0.2}),
    (ZERO_SNR, {}), (ZERO_SNR, {"eta": 0.7}), ({**SD, **ZERO_SNR}, {}), ({**SD, **ZERO_SNR, **THRESHOLD}, {"eta": 0.3}),
    ({"rescale_betas_zero_snr": True, "set_alpha_to_one": False}, {"eta": 0.3}),
]


@pytest.mark.parametrize("config", DDPM_CASES)
def test_full_ddpm_loop_matches_diffusers(config):
    theirs = diffusers.DDPMScheduler(**config)
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddpm", noise_source="diffusers")
    expected = run(theirs, 10)
    got = run(ours, 10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert [ours.previous_timestep(t) for t in ours.timesteps] == [int(theirs.previous_timestep(t))
                                                                   for t in theirs.timesteps]
    assert (got - expected).abs().max() < ATOL


@pytest.mark.parametrize("config, step_kwargs", DDIM_CASES)
def test_full_ddim_loop_matches_diffusers(config, step_kwargs):
    theirs = diffusers.DDIMScheduler(**config)
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddim", noise_source="diffusers")
    expected = run(theirs, 10, **step_kwargs)
    got = run(ours, 10, **step_kwargs)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert (got - expected).abs().max() < ATOL


def test_custom_timesteps_match_diffusers():
    custom = [950, 700, 420, 111, 5]
    theirs = diffusers.DDPMScheduler()
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddpm", noise_source="diffusers")
    expected = run(theirs, timesteps=custom)
    assert (run(ours, timesteps=custom) - expected).abs().max() < ATOL
    assert ours.timesteps.tolist() == custom and ours.previous_timestep(111) == 5 and ours.previous_timestep(5) == -1
    for bad in ([5, 700], [1000, 3], []):
        with pytest.raises(ValueError, match="timesteps"):
            ours.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="exactly one"):
        ours.set_timesteps(10, timesteps=custom)


def test_kernel_noise_is_the_default_and_differs_from_diffusers_noise():
    kernel = AnalyticDPMScheduler(method="ddpm", timestep_spacing="leading")
    theirs = diffusers.DDPMScheduler()
    differ = (run(kernel, 10) - run(theirs, 10)).abs().max()
    assert differ > 1e-2  # another noise stream: equally Gaussian, not equal
    assert torch.equal(run(kernel, 10), run(kernel, 10))


@pytest.mark.parametrize("key, value, match", [
    ("variance_type", "learned_range", "variance_type"),
    ("variance_type", "fixed_large_log", "variance_type"),
    ("prediction_type", "flow_prediction", "prediction_type"),
    ("beta_schedule", "exp", "beta_schedule"),
    ("dynamic_thresholding_ratio", "high", "dynamic_thresholding_ratio"),
    ("timestep_spacing", "karras", "timestep_spacing"),
    ("noise_source", "numpy", "noise_source"),
    ("skip_prk_steps", True, "skip_prk_steps"),
])
def test_unsupported_keys_raise(key, value, match):
    with pytest.raises(ValueError, match=match):
        AnalyticDPMScheduler.from_config({**diffusers.DDPMScheduler().config, key: value})
    if key != "skip_prk_steps":
        with pytest.raises(ValueError, match=match):
            plain.AnalyticDPMScheduler(**{key: value})


def test_other_bad_input_raises():
    with pytest.raises(ValueError, match="steps_offset"):
        AnalyticDPMScheduler(steps_offset=1)  # 'even' spacing: the offset would mean nothing
    s = AnalyticDPMScheduler(method="ddpm", timestep_spacing="leading")
    s.set_timesteps(5)
    x = torch.zeros(SHAPE)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="eta"):
        s.step(x, t, x, eta=0.5)
    with pytest.raises(ValueError, match="not both"):
        s.step(x, t, x, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="one per sample"):
        s.step(x, t, x, generator=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="not one of"):
        s.step(x, 3, x)


def test_plain_class_says_what_it_lacks():
    s = plain.AnalyticDPMScheduler(method="ddim")
    with pytest.raises(ImportError, match="diffusers"):
        s.save_pretrained("unused")
    with pytest.raises(ValueError, match="skip_prk_steps"):
        plain.AnalyticDPMScheduler.from_config({"skip_prk_steps": True})
    copy = plain.AnalyticDPMScheduler.from_config(s.config)
    assert torch.equal(run(copy, 4), run(s, 4))
