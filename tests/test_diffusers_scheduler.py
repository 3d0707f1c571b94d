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


def test_thresholding_and_zero_snr_cases_act():
    """The loop cases above could fail: each key changes diffusers' own samples."""
    for cls, key_config in ((diffusers.DDPMScheduler, THRESHOLD), (diffusers.DDIMScheduler, THRESHOLD),
                            (diffusers.DDPMScheduler, ZERO_SNR), (diffusers.DDIMScheduler, ZERO_SNR)):
        plain_config = {k: v for k, v in key_config.items() if k in ("prediction_type", "timestep_spacing")}
        assert (run(cls(**key_config), 10) - run(cls(**plain_config), 10)).abs().max() > 10 * ATOL


def _literal_values(annotation):
    """The values of a Literal annotation (also inside Optional / unions), else ()."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(v for arg in typing.get_args(annotation) for v in _literal_values(arg))


def test_every_diffusers_config_key_is_honoured_or_raises():
    """Enumerates DDPMScheduler's and DDIMScheduler's config keys (and the values of their Literal
    keys) at runtime: each key must be exercised with a non-default value by a loop test above, and
    each listed value must be either exercised there or refused. A key or value a new diffusers adds
    fails here until it is handled."""
    exercised = {}
    for config in DDPM_CASES + [c for c, _ in DDIM_CASES]:
        for key, value in config.items():
            exercised.setdefault(key, []).append(value)
    refused = {("variance_type", v) for v in ("fixed_large_log", "learned", "learned_range")}
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        params = inspect.signature(cls.__init__).parameters
        keys = {k for k in cls().config if not k.startswith("_")}
        assert keys == set(params) - {"self"}
        assert keys <= set(plain.CONFIG_KEYS), f"{cls.__name__}: keys unknown to AnalyticDPMScheduler"
        assert not keys - set(exercised), f"{cls.__name__}: keys no loop test exercises"
        for key in keys:
            for value in _literal_values(params[key].annotation):
                if ("variance_type", value) in refused:
                    with pytest.raises(ValueError, match=key):
                        AnalyticDPMScheduler.from_config({**cls().config, key: value}, method="ddpm")
                elif value != params[key].default:
                    assert value in exercised[key], f"{cls.__name__}: {key}={value!r} is neither tested nor refused"


def test_zero_snr_refusals():
    """Zero terminal SNR: a_{N} = 0. An eps step from there, the analytic variance and the DP
    trajectory would divide by it: refused with the key named."""
    eps = AnalyticDPMScheduler.from_config(diffusers.DDPMScheduler(rescale_betas_zero_snr=True,
                                                                  timestep_spacing="trailing").config, method="ddpm")
    eps.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        eps.step(x, eps.timesteps[0], x)
    eps.step(x, eps.timesteps[1], x)  # the later steps have a_t > 0
    for kwargs in ({"method": "analytic-ddpm", "gamma": 0.5}, {"method": "analytic-ddim", "gamma": 0.5},
                   {"method": "analytic-ddpm", "gamma": 0.5, "timestep_spacing": "optimal"}):
        with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
            AnalyticDPMScheduler(rescale_betas_zero_snr=True, **kwargs)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        eps.optimal_timesteps(5)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        eps.estimate_gamma(lambda x, t: x, torch.zeros(2, 3))
    assert float(eps.schedule.alphas_cumprod[-1]) == 0 and eps.schedule.zero_terminal_snr


@pytest.mark.parametrize("method", ["analytic-ddpm", "analytic-ddim"])
def test_thresholding_with_the_analytic_methods(method):
    """No diffusers counterpart: checked against the float64 reference step on diffusers' own
    thresholded x0_hat, with the analytic covariance bounded by R = 1."""
    from fastnotes.reference import diffusion as reference
    gamma = 0.3
    ours = AnalyticDPMScheduler(method=method, gamma=gamma, eta=0.4 if method == "analytic-ddim" else 0.0,
                                **THRESHOLD)
    theirs = diffusers.DDPMScheduler(**THRESHOLD)
    ours.set_timesteps(10)
    gen = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t_d = int(ours.timesteps[2])
    t, s = t_d + 1, ours.previous_timestep(t_d) + 1
    m = model(x, t_d)
    got = ours.step(m, t_d, x, variance_noise=z)
    logab = ours.schedule.log_alphas_cumprod
    a, sg = torch.exp(0.5 * logab[t]), torch.sqrt(-torch.expm1(logab[t]))
    x0_raw = (x - sg * m) / a
    x0 = theirs._threshold_sample(x0_raw)
    assert torch.allclose(got.pred_original_sample, x0, atol=1e-12)
    eps = m  # the DDIM direction uses the model's own eps_hat, not one re-derived from the thresholded x0_hat
    tt, ss = torch.tensor([t] * SHAPE[0]), torch.tensor([s] * SHAPE[0])
    sc = reference.step_scalars(logab, tt, ss, method=method, eta=ours.config.eta,
                                gamma=torch.full((SHAPE[0],), gamma, dtype=torch.float64), cov_max=1.0)
    shape = (-1, 1, 1, 1)
    if method == "analytic-ddpm":
        mean = (sc["a_s"] * sc["be_ts"] / sc["oma_t"]).reshape(shape) * x0 + (
            sc["sqrt_al_ts"] * sc["oma_s"] / sc["oma_t"]).reshape(shape) * x
    else:
        mean = sc["a_s"].reshape(shape) * x0 + torch.sqrt(sc["oma_s"] - sc["lam2"]).reshape(shape) * eps
    expected = mean + sc["sigma2"].sqrt().reshape(shape) * z
    assert (got.prev_sample - expected).abs().max() < 1e-10
    assert (x0 - x0_raw.clamp(-1, 1)).abs().max() > 1e-2  # thresholding is not plain clipping here


@pytest.mark.parametrize("cls", [diffusers.DDPMScheduler, diffusers.DDIMScheduler])
@pytest.mark.parametrize("config", [{}, {"beta_schedule": "scaled_linear"}, {"rescale_betas_zero_snr": True}])
def test_add_noise_and_get_velocity_match_diffusers(cls, config):
    theirs = cls(**config)
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddpm" if cls is diffusers.DDPMScheduler else "ddim")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 4, generator=gen), torch.randn(5, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 500, 998, 999])
    # diffusers forms 1 - ab_t in float32 (at t = 0, 1 - 0.9999 keeps ~4 digits), we in float64
    assert (ours.add_noise(x0, noise, t) - theirs.add_noise(x0, noise, t)).abs().max() < 1e-5
    if hasattr(theirs, "get_velocity"):
        assert (ours.get_velocity(x0, noise, t) - theirs.get_velocity(x0, noise, t)).abs().max() < 1e-5
    # the v target is what a v_prediction step expects: x0_hat = a x_t - sg v recovers x0
    v = ours.get_velocity(x0.double(), noise.double(), t)
    a, sg = (c.double() for c in ours._forward_coefficients(x0.double(), t))
    assert (a * ours.add_noise(x0.double(), noise.double(), t) - sg * v - x0.double()).abs().max() < 1e-12
    with pytest.raises(TypeError, match="timesteps"):
        ours.add_noise(x0, noise, t.float())


def test_estimate_gamma_through_the_scheduler(capsys):
    """scheduler.estimate_gamma(unet, data): diffusers numbering, the model's prediction type turned
    into eps, gamma stored (and saved); equal to fastnotes.diffusion.estimate_gamma on the eps model."""
    from fastnotes.diffusion import estimate_gamma

    def eps_true(x, t):  # our numbering
        return 0.5 * x + 1e-4 * t.reshape(-1, 1).double().to(x.dtype)

    data = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = AnalyticDPMScheduler()
    steps = [999, 400, 0]
    expected = estimate_gamma(eps_true, data, sched.schedule, [t + 1 for t in steps], n_samples=6, seed=7,
                              progress=False)
    for prediction in ("epsilon", "v_prediction", "sample"):
        s = AnalyticDPMScheduler(prediction_type=prediction)

        def unet(x, t_d, s=s):  # the diffusers-numbered model of this prediction type
            a, sg = s._forward_coefficients(x, t_d)
            e = eps_true(x, t_d + 1)
            x0 = (x - sg * e) / a
            return {"epsilon": e, "v_prediction": a * e - sg * x0, "sample": x0}[prediction]

        table = s.estimate_gamma(unet, data, n_samples=6, timesteps=steps, seed=7, progress=True)
        assert torch.equal(s.gamma, table) and torch.allclose(table, expected, rtol=1e-10, atol=0)
        assert table[1000] > 0 and table[500] == 0
    assert "estimate_gamma" in capsys.readouterr().err  # the progress bar


def test_estimate_gamma_from_a_pipeline_unet_is_saved(tmp_path):
    unet = _tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=AnalyticDPMScheduler(method="analytic-ddpm"))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    table = pipe.scheduler.estimate_gamma(pipe.unet, images, n_samples=3, timesteps=range(0, 1000, 100), seed=0,
                                          progress=False)
    assert torch.isfinite(table).all() and (table[1::100] > 0).all()
    pipe.scheduler.save_pretrained(tmp_path)  # a pipeline saves its scheduler so (test above)
    assert torch.equal(AnalyticDPMScheduler.from_pretrained(tmp_path).gamma, table)


def test_optimal_timesteps():
    from fastnotes.diffusion import optimal_trajectory
    gamma = 0.2 + 0.7 * torch.linspace(0, 1, 1001, dtype=torch.float64) ** 2
    s = AnalyticDPMScheduler(gamma=gamma)
    got = s.optimal_timesteps(8)
    path, _ = optimal_trajectory(s.schedule, gamma, 8)
    assert got == [t - 1 for t in reversed(path)] and got[0] == 999 and got[-1] == 0 and len(got) == 8
    assert got != [t - 1 for t in reversed(plain.even_trajectory(1000, 8))]
    spaced = AnalyticDPMScheduler(gamma=gamma, timestep_spacing="optimal")
    spaced.set_timesteps(8)
    assert spaced.timesteps.tolist() == got
    s.set_timesteps(timesteps=got)
    assert s.timesteps.tolist() == got and torch.isfinite(run(s, timesteps=got)).all()
    # usable with diffusers' own DDPM on the same custom timesteps: the ddpm mode equals it
    theirs = diffusers.DDPMScheduler()
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddpm", noise_source="diffusers")
    assert (run(ours, timesteps=got) - run(theirs, timesteps=got)).abs().max() < ATOL
    with pytest.raises(ValueError, match="needs gamma"):
        AnalyticDPMScheduler().optimal_timesteps(8)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.optimal_timesteps(0)


@pytest.mark.parametrize("clip_sigma_steps", [None, 3])
def test_clip_pixel_equals_sample(clip_sigma_steps):
    """The scheduler's noise clip is fastnotes.diffusion.sample's (the paper's clip_pixel on the steps
    into the lowest clip_sigma_steps nodes): same kernel noise from one generator, same samples."""
    from fastnotes.diffusion import sample
    extra = {} if clip_sigma_steps is None else {"clip_sigma_steps": clip_sigma_steps}
    s = AnalyticDPMScheduler(gamma=0.4, clip_pixel=2, **extra)
    s.set_timesteps(6)
    trajectory = sorted(int(t) + 1 for t in s.timesteps)

    def ours(clipped):
        s.register_to_config(clip_pixel=2 if clipped else None)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(SHAPE, generator=gen)
        for t in s.timesteps:
            x = s.step(model(x, t), t, x, generator=gen).prev_sample
        return x

    expected = sample(lambda x, t: model(x, int(t[0]) - 1), SHAPE, s.schedule, trajectory, "analytic-ddpm",
                      gamma=0.4, clip_pixel=2, clip_sigma_steps=clip_sigma_steps,
                      generator=torch.Generator().manual_seed(5), progress=False)
    assert (ours(True) - expected).abs().max() < 1e-6
    assert (ours(False) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="clip_pixel"):
        AnalyticDPMScheduler(clip_pixel=-1)
    with pytest.raises(ValueError, match="clip_sigma_steps"):
        AnalyticDPMScheduler(clip_sigma_steps=0)


@pytest.mark.parametrize("cls, method", [(diffusers.DDPMScheduler, "ddpm"), (diffusers.DDIMScheduler, "ddim")])
def test_thresholding_in_half_precision(cls, method):
    """float16 samples: the quantile runs in float32 (as diffusers), the outputs stay float16."""
    theirs = cls(**THRESHOLD)
    ours = AnalyticDPMScheduler.from_config(theirs.config, method=method, noise_source="diffusers")
    results = []
    for s in (theirs, ours):
        s.set_timesteps(10)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE, generator=gen).half()
        for t in s.timesteps:
            out = s.step(model(x.float(), t).half(), t, x, generator=gen)
            x = out.prev_sample
        results.append(out)
    assert results[1].prev_sample.dtype == results[1].pred_original_sample.dtype == torch.float16
    assert (results[0].prev_sample.float() - results[1].prev_sample.float()).abs().max() < 1e-2  # a few fp16 ulps


def test_the_new_keys_round_trip(tmp_path):
    s = AnalyticDPMScheduler(method="ddim", eta=0.4, noise_source="diffusers", clip_pixel=1.5, clip_sigma_steps=2,
                             **THRESHOLD, **ZERO_SNR)
    s.save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.thresholding and loaded.config.rescale_betas_zero_snr and loaded.config.clip_pixel == 1.5
    assert torch.equal(run(loaded, 8), run(s, 8))
