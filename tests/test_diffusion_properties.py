"""Property tests of fastnotes.diffusion.sampler_step (hypothesis): random shapes, per-sample or
shared timesteps, every method, prediction, eta, clipping range, noise clip, dtype, layout, out=,
given or in-kernel noise, on every backend, against the float64 reference; bad input names the
argument. Small budgets and tiny shapes (the Triton interpreter costs ~3 ms per program)."""
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import given
from hypothesis import strategies as st
from oracle import assert_close_to_oracle, property_settings

import fastnotes
from fastnotes.diffusion import NoiseSchedule, _rng, sampler_step
from fastnotes.diffusion.step import step_coefficients
from fastnotes.reference import diffusion as reference

METHODS = ("ddpm", "ddpm-large", "ddim", "analytic-ddpm", "analytic-ddim", "ode-euler")
SCHEDULES = {"linear": NoiseSchedule.linear(1000), "cosine": NoiseSchedule.cosine(200)}
BACKENDS = available_backends()
SETTINGS = property_settings(25)


def dtypes_for(backend):
    if backend == "triton":
        return [torch.float32]  # the interpreter runs float32 only
    return [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def laid_out(value, layout):
    """A copy of value in a given memory layout: contiguous, every other element of a wider tensor,
    or a transposed view (trailing dims reversed in memory)."""
    value = value.clone()  # never the caller's tensor (.contiguous() can return it): out= may overwrite it
    if layout == "strided":
        wide = torch.empty(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype, device=value.device)
        wide[..., ::2] = value
        return wide[..., ::2]
    if layout == "transposed" and value.dim() >= 3:
        return value.transpose(1, -1).contiguous().transpose(1, -1)
    return value


@st.composite
def step_case(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from(dtypes_for(backend)))
    schedule_name = draw(st.sampled_from(sorted(SCHEDULES)))
    n = SCHEDULES[schedule_name].num_steps
    batch = draw(st.integers(1, 3))
    shape = (batch, *draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
    t = draw(st.lists(st.integers(1, n), min_size=batch, max_size=batch))
    s = [draw(st.integers(0, ti - 1)) for ti in t]
    form = draw(st.sampled_from(["int", "0-d", "[B]"])) if len(set(zip(t, s))) == 1 else "[B]"
    method = draw(st.sampled_from(METHODS))
    eta = draw(st.floats(0, 2)) if method in ("ddim", "analytic-ddim") else 0.0
    clip = None if method == "ode-euler" else draw(st.one_of(
        st.none(), st.booleans(), st.tuples(st.floats(-3, 0.5), st.floats(0.1, 3)).filter(lambda r: r[0] < r[1])))
    return dict(
        backend=backend, dtype=dtype, schedule=schedule_name, shape=shape, t=t, s=s, form=form, method=method,
        eta=eta, clip=clip, prediction=draw(st.sampled_from(["eps", "x0", "v"])),
        gamma=draw(st.floats(0, 1.2)) if method.startswith("analytic") else None,
        clip_pixel=None if method == "ode-euler" else draw(st.one_of(st.none(), st.floats(0.25, 8))),
        noise=draw(st.sampled_from(["given", "generated"])),
        layouts=draw(st.lists(st.sampled_from(["contiguous", "strided", "transposed"]), min_size=3, max_size=3)),
        out=draw(st.sampled_from(["none", "buffer", "in-place"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def timestep_arg(values, form):
    if form == "int":
        return values[0]
    if form == "0-d":
        return torch.tensor(values[0])
    return torch.tensor(values)


def expected_clip_range(clip, method):
    """sampler_step's clip_denoised rule: None -> [-1, 1] for the analytic methods, off otherwise."""
    if clip is None:
        return (-1.0, 1.0) if method.startswith("analytic") else None
    if isinstance(clip, bool):
        return (-1.0, 1.0) if clip else None
    return clip


@SETTINGS
@given(case=step_case())
def test_step_against_float64_reference(case):
    schedule = SCHEDULES[case["schedule"]]
    dtype, shape, method = case["dtype"], case["shape"], case["method"]
    gen = torch.Generator().manual_seed(case["seed"])
    x, m, z = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    x_in, m_in, z_in = (laid_out(v.to(DEVICE), layout) for v, layout in zip((x, m, z), case["layouts"]))
    kw = dict(method=method, prediction=case["prediction"], clip_denoised=case["clip"], clip_pixel=case["clip_pixel"])
    if method in ("ddim", "analytic-ddim"):
        kw["eta"] = case["eta"]
    if case["gamma"] is not None:
        kw["gamma"] = case["gamma"]
    if case["noise"] == "given":
        kw["noise"] = z_in
    else:
        kw["generator"] = torch.Generator().manual_seed(case["seed"])
        keys = _rng.keys_from_seed(_rng.draw_seed(torch.Generator().manual_seed(case["seed"])))
        z = reference.counter_normal(shape, keys)
    if case["out"] == "buffer":
        kw["out"] = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    elif case["out"] == "in-place":
        x_in = x_in.contiguous()
        kw["out"] = x_in
    with fastnotes.use_backend(case["backend"]):
        got = sampler_step(x_in, m_in, timestep_arg(case["t"], case["form"]), timestep_arg(case["s"], case["form"]),
                           schedule, **kw)
    if "out" in kw:
        assert got is kw["out"]
    assert got.dtype == dtype and got.shape == shape

    # the float64 oracle on the same (rounded) inputs, and the same step composed in `dtype`
    t, s = torch.tensor(case["t"]), torch.tensor(case["s"])
    clip_range = expected_clip_range(case["clip"], method)
    sigma2_max = math.inf if case["clip_pixel"] is None else (case["clip_pixel"] * 2 / 255) ** 2 * math.pi / 2
    gamma = None if case["gamma"] is None else torch.full((len(case["t"]),), case["gamma"], dtype=torch.float64)

    def oracle(work):
        return reference.sampler_step(x.to(work), m.to(work), t, s, schedule.log_alphas_cumprod, method=method,
                                      eta=case["eta"], prediction=case["prediction"], gamma=gamma,
                                      clip_range=clip_range, noise=z.to(work), sigma2_max=sigma2_max).double()

    exact = oracle(torch.float64)
    # fused rounding: a few units of the working precision of each term of A x + M m + C x0 + S z,
    # and one unit of `dtype` per entry (in place of the rule's floor * max(1, |exact|), which is looser)
    coef = torch.from_numpy(step_coefficients(
        schedule.log_alphas_cumprod.numpy(), t.numpy(), s.numpy(), method=method, eta=case["eta"],
        prediction=case["prediction"], gamma_t=None if gamma is None else gamma.numpy(), clip_range=clip_range,
        sigma2_max=sigma2_max)).reshape(-1, *[1] * (len(shape) - 1), 8).abs()
    ax, am, az = x.double().abs(), m.double().abs(), z.double().abs()
    terms = coef[..., 0] * ax + coef[..., 1] * am + coef[..., 2] * (coef[..., 3] * ax + coef[..., 4] * am)
    terms = terms + coef[..., 5] * az
    work_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    allowance = 16 * work_eps * terms + torch.finfo(dtype).eps * exact.abs()
    if case["noise"] == "generated":  # float32 log/sin/cos polynomials vs float64 torch
        allowance = allowance + coef[..., 5] * 4e-6 * (1 + az)
    assert_close_to_oracle(got, exact, oracle(dtype), 0.0, "step", terms=allowance, roundoff=1.0)


# ---- bad input names the argument --------------------------------------------------------------------


@st.composite
def bad_call(draw):
    """(arguments, the name the error must start with) for one wrong argument of a valid call."""
    n = 50
    batch = draw(st.integers(1, 3))
    shape = (batch, draw(st.integers(1, 5)))
    args = dict(t=draw(st.integers(2, n)), s=0, method=draw(st.sampled_from(METHODS[:5])))
    kind = draw(st.sampled_from(["t_high", "t_low", "s_negative", "s_not_below_t", "s_high", "t_shape", "m_shape",
                                 "noise_shape", "eta", "clip_pixel"]))
    x = torch.zeros(shape)
    m, noise = torch.zeros(shape), None
    if kind == "t_high":
        args["t"] = draw(st.integers(n + 1, 10**6))
    elif kind == "t_low":
        args["t"] = torch.tensor([draw(st.integers(-5, 0))] * batch)
    elif kind == "s_negative":
        args["s"] = draw(st.integers(-10**6, -1))
    elif kind == "s_not_below_t":
        args["s"] = torch.tensor([draw(st.integers(args["t"], n))] * batch)
    elif kind == "s_high":
        args["s"] = draw(st.integers(n + 1, 10**6))
    elif kind == "t_shape":
        args["t"] = torch.full((batch + draw(st.integers(1, 3)),), args["t"])
    elif kind == "m_shape":
        m = torch.zeros(batch, shape[1] + draw(st.integers(1, 3)))
    elif kind == "noise_shape":
        noise = torch.zeros(batch + 1, shape[1])
    elif kind == "eta":
        args["method"] = "ddim"
        args["eta"] = draw(st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf)))
    else:
        args["clip_pixel"] = draw(st.one_of(st.floats(max_value=0), st.just(math.nan), st.just(math.inf)))
    if args["method"].startswith("analytic"):
        args["gamma"] = 0.5
    name = {"t_high": "t", "t_low": "t", "s_negative": "s", "s_not_below_t": "s", "s_high": "s", "t_shape": "t",
            "m_shape": "model_output", "noise_shape": "noise", "eta": "eta", "clip_pixel": "clip_pixel"}[kind]
    return x, m, noise, args, name


@SETTINGS
@given(call=bad_call())
def test_bad_input_raises_naming_the_argument(call):
    x, m, noise, args, name = call
    schedule = NoiseSchedule.linear(50)
    t, s = args.pop("t"), args.pop("s")
    with pytest.raises(ValueError, match=rf"^sampler_step: {name} "):
        sampler_step(x, m, t, s, schedule, noise=noise, **args)


def test_step_coefficients_torch_prologue_matches_numpy(rng):
    """The prologue runs in torch (on the device, no host sync) when the timesteps live on a GPU;
    no CPU call of sampler_step reaches that path, so compare it with the numpy one here."""
    schedule = SCHEDULES["cosine"]
    t = torch.randint(1, 201, (64,), generator=rng)
    s = (torch.rand(64, generator=rng, dtype=torch.float64) * t).long().clamp(max=t - 1)
    gamma = torch.rand(64, generator=rng, dtype=torch.float64) * 1.2
    for method in METHODS:
        for prediction in ("eps", "x0", "v"):
            for clip_range in (None, (-0.5, 2.0)):
                if method == "ode-euler" and clip_range is not None:
                    continue
                kw = dict(method=method, eta=0.7, prediction=prediction, clip_range=clip_range, sigma2_max=1e-3)
                host = step_coefficients(schedule.log_alphas_cumprod.numpy(), t.numpy(), s.numpy(),
                                         gamma_t=gamma.numpy(), **kw)
                device = step_coefficients(schedule.log_alphas_cumprod, t, s, gamma_t=gamma, **kw)
                assert isinstance(device, torch.Tensor)
                np.testing.assert_allclose(device.numpy(), host, rtol=1e-13, atol=1e-300)
