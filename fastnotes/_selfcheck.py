"""Self-check and quick timing of every op, for `python -m fastnotes`.

Each op registers one check (fused backend vs the float64 reference on fresh random inputs,
forward and backward) and one timing case (fused vs the composite users would write)."""
import time

import torch

from . import _dispatch, reference
from .diffusion import NoiseSchedule, sampler_step
from .exact import expected_accuracy, gauss_hermite
from .losses import multilabel_ce
from .reference import diffusion as reference_diffusion
from .reference import exact as reference_exact

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}


def _multilabel_ce_check(device, dtype):
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    logits = (torch.randn(64, 1001, generator=gen, dtype=torch.float64) * 4)
    targets = torch.rand(64, 1001, generator=gen, dtype=torch.float64)
    targets = torch.where(torch.rand(64, 1001, generator=gen, dtype=torch.float64) < 0.5, (targets > 0.9).double(), targets)
    mask = torch.rand(64, 1001, generator=gen) < 0.9
    upstream = torch.randn(64, dtype=torch.float64, generator=gen)
    exact_x = logits.clone().requires_grad_()
    exact = reference.multilabel_ce(exact_x, targets, mask, "none")
    exact.backward(upstream)
    x = logits.to(device=device, dtype=dtype).requires_grad_()
    loss = multilabel_ce(x, targets.to(device=device, dtype=dtype), mask=mask.to(device), reduction="none")
    loss.backward(upstream.to(device=device, dtype=dtype))
    scale = max(1.0, exact.abs().max().item())
    return {"value_error": (loss.double().cpu() - exact.detach()).abs().max().item() / scale,
            "grad_error": (x.grad.double().cpu() - exact_x.grad).abs().max().item()}


def _multilabel_ce_timing(device):
    logits = torch.randn(256, 20000, device=device) * 3
    targets = (torch.rand(256, 20000, device=device) < 0.01).float()

    def fused():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(multilabel_ce(x, targets), x)

    def composite():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(reference.multilabel_ce_composite(x, targets).mean(), x)

    return {"shape": "256x20000 fp32 fwd+bwd", "fused": fused, "composite": composite}


def _expected_accuracy_check(device, dtype):
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    logits = torch.randn(32, 101, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 101, (32,), generator=gen)
    upstream = torch.randn(32, dtype=torch.float64, generator=gen)
    exact_x = logits.clone().requires_grad_()
    nodes, weights = gauss_hermite(32)
    exact = reference_exact.expected_accuracy(exact_x, labels, torch.full((32,), 0.5, dtype=torch.float64), None,
                                              nodes, weights)
    exact.backward(upstream)
    x = logits.to(device=device, dtype=dtype).requires_grad_()
    prob = expected_accuracy(x, labels.to(device), sigma=0.5)
    prob.backward(upstream.to(device=device, dtype=dtype))
    return {"value_error": (prob.double().cpu() - exact.detach()).abs().max().item(),
            "grad_error": (x.grad.double().cpu() - exact_x.grad).abs().max().item()}


def _expected_accuracy_timing(device):
    logits = torch.randn(256, 1000, device=device)
    labels = torch.randint(0, 1000, (256,), device=device)
    nodes, weights = gauss_hermite(32)
    sigma_rows = torch.full((256,), 0.5, device=device)

    def fused():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(expected_accuracy(x, labels, sigma=0.5).sum(), x)

    def composite():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(reference_exact.expected_accuracy(x, labels, sigma_rows, None, nodes, weights).sum(), x)

    return {"shape": "256x1000 fp32 fwd+bwd", "fused": fused, "composite": composite}


_DIFFUSION_SCHEDULE = NoiseSchedule.linear(1000)


def _sampler_step_check(device, dtype):
    """analytic-DDPM step with clipping against the float64 reference, given the same noise. The
    sampler is inference only: no gradient to check."""
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    shape = (8, 3, 17, 19)
    x, eps, z = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.randint(2, 1001, (8,), generator=gen)
    s = (torch.rand(8, generator=gen, dtype=torch.float64) * t).long().clamp(max=t - 1)
    gamma = torch.rand(1001, generator=gen, dtype=torch.float64)
    exact = reference_diffusion.sampler_step(x, eps, t, s, _DIFFUSION_SCHEDULE.log_alphas_cumprod,
                                             method="analytic-ddpm", gamma=gamma[t], clip_range=(-1.0, 1.0), noise=z)
    got = sampler_step(x.to(device=device, dtype=dtype), eps.to(device=device, dtype=dtype), t.to(device),
                       s.to(device), _DIFFUSION_SCHEDULE, method="analytic-ddpm", gamma=gamma,
                       noise=z.to(device=device, dtype=dtype))
    scale = max(1.0, exact.abs().max().item())
    return {"value_error": (got.double().cpu() - exact).abs().max().item() / scale, "grad_error": 0.0}


def _sampler_step_timing(device):
    x = torch.randn(64, 3, 64, 64, device=device)
    eps = torch.randn(64, 3, 64, 64, device=device)
    t = torch.full((64,), 500, device=device)
    s = torch.full((64,), 480, device=device)
    logab = _DIFFUSION_SCHEDULE.log_alphas_cumprod_on(device)

    def fused():
        sampler_step(x, eps, 500, 480, _DIFFUSION_SCHEDULE, method="ddpm", clip_denoised=True)

    def composite():
        reference_diffusion.sampler_step_composite(x, eps, t, s, logab, method="ddpm", clip_range=(-1.0, 1.0),
                                                   noise=torch.randn_like(x))

    return {"shape": "64x3x64x64 fp32 step", "fused": fused, "composite": composite}


OPS = {"multilabel_ce": (_multilabel_ce_check, _multilabel_ce_timing),
       "expected_accuracy": (_expected_accuracy_check, _expected_accuracy_timing),
       "sampler_step": (_sampler_step_check, _sampler_step_timing)}


def backends_for(device_type):
    return [b for b in ("cuda", "triton", "numba") if _dispatch.availability(b, device_type) is None]


def run_checks(device):
    """One row per (op, backend, dtype): errors vs the float64 reference and pass/fail."""
    rows = []
    for op, (check, _) in OPS.items():
        for backend in backends_for(device.type) + ["reference"]:
            for dtype in (torch.float32, torch.float64):
                row = {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
                with _dispatch.use_backend(backend):
                    try:
                        row.update(check(device, dtype))
                    except _dispatch.BackendUnsupportedError:
                        continue  # e.g. triton has no float64 path
                    except Exception as exc:  # a crash is a failed check, reported, not raised
                        row.update(error=f"{type(exc).__name__}: {exc}")
                tol = TOLERANCE[dtype]
                row["tolerance"] = tol
                row["passed"] = "error" not in row and row["value_error"] <= tol and row["grad_error"] <= tol
                rows.append(row)
    return rows


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_timings(device, repeats=5):
    rows = []
    for op, (_, timing) in OPS.items():
        case = timing(device)
        fused = _median_ms(case["fused"], repeats)
        composite = _median_ms(case["composite"], repeats)
        rows.append({"op": op, "case": case["shape"], "fused_ms": fused, "composite_ms": composite,
                     "speedup": composite / fused})
    return rows
