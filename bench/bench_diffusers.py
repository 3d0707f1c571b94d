"""Benchmark: one denoising step inside a diffusers pipeline, AnalyticDPMScheduler against diffusers'
DDPMScheduler / DDIMScheduler (issue 17).

    pytest bench/bench_diffusers.py --benchmark-json=bench/results/diffusers.json
    python bench/report.py bench/results/diffusers.json --out BENCHMARKS.md

Modes (per shape, float32, the 11th of 50 timesteps of the default 'leading' spacing):
    scheduler   scheduler.step(model_output, t, sample, generator=g) alone, as DDPMPipeline /
                DDIMPipeline call it (a torch.Generator passed, eta = 0 for DDIM)
    unet+step   the whole denoising step: unet(sample, t).sample, then scheduler.step, with a tiny
                random UNet2DModel (block_out_channels (16, 32), one layer per block)
Contenders (schedulers built with from_config of the diffusers scheduler's config):
    fastnotes-numba-ddpm            AnalyticDPMScheduler(method='ddpm'), noise drawn in the kernel
    fastnotes-numba-ddpm-dnoise     the same with noise_source='diffusers' (diffusers' own torch.randn)
    fastnotes-numba-ddim            AnalyticDPMScheduler(method='ddim'), eta = 0
    fastnotes-numba-analytic-ddpm   AnalyticDPMScheduler(method='analytic-ddpm'), gamma = 0.5
    diffusers-ddpm                  DDPMScheduler.step
    diffusers-ddim                  DDIMScheduler.step (eta = 0)
bytes (scheduler mode) = compulsory traffic: read sample and model_output, write prev_sample, 4 bytes
each per element.
"""
import os
import tempfile
import time

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastnotes-bench-numba-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
from _shared import backend_of  # noqa: E402

import fastnotes  # noqa: E402
from fastnotes import _env  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from fastnotes.integrations.diffusers import AnalyticDPMScheduler  # noqa: E402

OP = "diffusers_scheduler_step"
SHAPES = [(16, 3, 64, 64), (64, 4, 64, 64)]
MODES = ["scheduler", "unet+step"]
CONTENDERS = ["fastnotes-numba-ddpm", "fastnotes-numba-ddpm-dnoise", "fastnotes-numba-ddim",
              "fastnotes-numba-analytic-ddpm", "diffusers-ddpm", "diffusers-ddim"]
MIN_ROUNDS, MAX_ROUNDS, ROUND_BUDGET_S = 5, 200, 1.5


def _scheduler(contender):
    ddim = contender.endswith("ddim")
    theirs = (diffusers.DDIMScheduler if ddim else diffusers.DDPMScheduler)()
    if contender.startswith("diffusers-"):
        return theirs
    method = {"fastnotes-numba-ddpm": "ddpm", "fastnotes-numba-ddpm-dnoise": "ddpm", "fastnotes-numba-ddim": "ddim",
              "fastnotes-numba-analytic-ddpm": "analytic-ddpm"}[contender]
    return AnalyticDPMScheduler.from_config(theirs.config, method=method,
                                            gamma=0.5 if method.startswith("analytic") else None,
                                            noise_source="diffusers" if contender.endswith("dnoise") else "kernel")


def _tiny_unet(channels):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=64, in_channels=channels, out_channels=channels,
                                 block_out_channels=(16, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def inputs(request):
    shape = request.param
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=gen)
    model_output = torch.randn(shape, generator=gen)
    yield shape, sample, model_output, _tiny_unet(shape[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", CONTENDERS)
@torch.no_grad()
def test_denoising_step(benchmark, inputs, contender, mode):
    shape, sample, model_output, unet = inputs
    sched = _scheduler(contender)
    sched.set_timesteps(50)
    t = sched.timesteps[10]
    gen = torch.Generator().manual_seed(1)
    if mode == "scheduler":
        def run():
            return sched.step(model_output, t, sample, generator=gen).prev_sample
    else:
        def run():
            return sched.step(unet(sample, t).sample, t, sample, generator=gen).prev_sample

    with fastnotes.use_backend(backend_of(contender)):
        run()
        start = time.perf_counter()
        run()
        call_s = time.perf_counter() - start
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(call_s, 1e-6))))
        benchmark.group = f"{OP} cpu {'x'.join(map(str, shape))} {mode}"
        benchmark.extra_info.update(
            op=OP, shape=list(shape), mode=mode, contender=contender, device="cpu", **_env.device_info("cpu"),
            versions={**_env.versions(), "diffusers": diffusers.__version__},
            bytes=12 * sample.numel() if mode == "scheduler" else None, dtype="float32",
        )
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2, iterations=1)
