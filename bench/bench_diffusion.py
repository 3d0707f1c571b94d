"""Benchmarks for fastnotes.diffusion.sampler_step (one DDPM step, eps prediction, x0 clipped to
[-1, 1] as diffusers' DDPMScheduler default) against the composites people use today.

    pytest bench/bench_diffusion.py --benchmark-json=bench/results/diffusion.json
    python bench/report.py bench/results/diffusion.json --out BENCHMARKS.md --plot bench/diffusion_cpu.png

Contenders, on the same x_t / model_output per (device, shape):
    fastnotes-numba            sampler_step under use_backend("numba"), noise drawn in the kernel
    fastnotes-numba-out        the same writing into a reused buffer (out=), as a sampling loop does
    fastnotes-numba-noise-out  the same with a given noise tensor (no noise generation), out=
    fastnotes-numba-ddim-out   a deterministic DDIM (eta = 0) step, out= (no noise at all)
    fastnotes-triton           sampler_step under use_backend("triton")  (CUDA tensors only)
    eager-composite            the stage-by-stage reference step in fp32 with torch.randn noise
    diffusers-ddpm             diffusers DDPMScheduler.step (draws its own noise), when installed
    diffusers-ddim             diffusers DDIMScheduler.step, eta = 0, when installed
    torch-randn                torch.randn_like(x) alone, for scale
    copy                       out.copy_(x) into a reused buffer: copy bandwidth for these tensors
    copy-dram                  a 256 MiB copy into a reused buffer: the machine's DRAM copy bandwidth
Mode "step". bytes = compulsory traffic: read x_t and model_output, write x_s (+ read noise when
given), 4 bytes each per element; for copy: read + write.
"""
import os
import tempfile
import time

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastnotes-bench-numba-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
from _shared import backend_of, skip_reason  # noqa: E402

import fastnotes  # noqa: E402
from fastnotes import _env  # noqa: E402
from fastnotes.diffusion import NoiseSchedule, sampler_step  # noqa: E402
from fastnotes.reference import diffusion as reference_diffusion  # noqa: E402

OP = "sampler_step"
SHAPES = [(64, 3, 64, 64), (16, 4, 128, 128)]
CONTENDERS = ["fastnotes-numba", "fastnotes-numba-out", "fastnotes-numba-noise-out", "fastnotes-numba-ddim-out",
              "fastnotes-triton", "eager-composite", "diffusers-ddpm", "diffusers-ddim", "torch-randn", "copy",
              "copy-dram"]
DRAM_COPY_BYTES = 256 * 2**20
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
T, S = 500, 480
MIN_ROUNDS, MAX_ROUNDS, ROUND_BUDGET_S = 5, 200, 1.5
SCHEDULE = NoiseSchedule.linear(1000)


@pytest.fixture(scope="module", params=[(d, s) for d in DEVICES for s in SHAPES],
                ids=lambda p: f"{p[0]}-{'x'.join(map(str, p[1]))}")
def inputs(request):
    device, shape = request.param
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    eps = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    yield device, shape, x, eps, noise


def _fn(contender, x, eps, noise, device):
    step = dict(method="ddpm", clip_denoised=True)
    if contender in ("fastnotes-numba", "fastnotes-triton"):
        return lambda: sampler_step(x, eps, T, S, SCHEDULE, **step)
    if contender == "fastnotes-numba-out":
        buffer = torch.empty_like(x)
        return lambda: sampler_step(x, eps, T, S, SCHEDULE, out=buffer, **step)
    if contender == "fastnotes-numba-noise-out":
        buffer = torch.empty_like(x)
        return lambda: sampler_step(x, eps, T, S, SCHEDULE, noise=noise, out=buffer, **step)
    if contender == "fastnotes-numba-ddim-out":
        buffer = torch.empty_like(x)
        return lambda: sampler_step(x, eps, T, S, SCHEDULE, method="ddim", clip_denoised=True, out=buffer)
    if contender == "eager-composite":
        b = x.shape[0]
        t = torch.full((b,), T, device=device)
        s = torch.full((b,), S, device=device)
        logab = SCHEDULE.log_alphas_cumprod_on(device)
        return lambda: reference_diffusion.sampler_step_composite(
            x, eps, t, s, logab, method="ddpm", clip_range=(-1.0, 1.0), noise=torch.randn_like(x))
    if contender in ("diffusers-ddpm", "diffusers-ddim"):
        diffusers = pytest.importorskip("diffusers")
        kind = diffusers.DDPMScheduler if contender == "diffusers-ddpm" else diffusers.DDIMScheduler
        sched = kind(num_train_timesteps=1000)
        sched.set_timesteps(50)
        t = int(sched.timesteps[10])
        return lambda: sched.step(eps, t, x).prev_sample
    if contender == "torch-randn":
        return lambda: torch.randn_like(x)
    if contender == "copy":
        buffer = torch.empty_like(x)
        return lambda: buffer.copy_(x)
    if contender == "copy-dram":
        source = torch.ones(DRAM_COPY_BYTES // 4, device=device)
        buffer = torch.empty_like(source)
        return lambda: buffer.copy_(source)
    raise ValueError(contender)


@pytest.mark.parametrize("contender", CONTENDERS)
def test_sampler_step(benchmark, inputs, contender):
    device, shape, x, eps, noise = inputs
    if skip_reason(contender, device):
        pytest.skip(skip_reason(contender, device))
    backend = backend_of(contender)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with fastnotes.use_backend(backend):
        fn = _fn(contender, x, eps, noise, device)

        def run():
            fn()
            sync()

        run()
        start = time.perf_counter()
        run()
        call_s = time.perf_counter() - start
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(call_s, 1e-6))))
        numel = x.numel()
        per_element = {"fastnotes-numba-noise-out": 16, "torch-randn": 4, "copy": 8}.get(contender, 12)
        compulsory = 2 * DRAM_COPY_BYTES if contender == "copy-dram" else numel * per_element
        benchmark.group = f"{OP} {device} {'x'.join(map(str, shape))} step"
        benchmark.extra_info.update(
            op=OP, shape=list(shape), mode="step", contender=contender, device=device, **_env.device_info(device),
            versions=_env.versions(), bytes=compulsory, dtype="float32", method="ddpm", clip=True,
        )
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2, iterations=1)
