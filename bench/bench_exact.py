"""Benchmarks for fastnotes.expected_accuracy / exact_loss (EXACT) against the plain-torch
Gauss-Hermite quadrature composite (fastnotes.reference.exact, the same math over a [B, C, K]
tensor), B = 256, C in {10, 100, 1000}, K = 32, fp32.

    pytest bench/bench_exact.py --benchmark-json=bench/results/exact.json

Memory: extra_info["saved_bytes"] is what autograd keeps for the backward (counted with
saved-tensor hooks): O(B C) for the fused op, O(B C K) for the composite. Compulsory bytes:
fwd reads the logits; fwd+bwd reads them twice and writes the gradient.
"""
import pytest
import torch
from _shared import backend_of, saved_bytes, skip_reason

import fastnotes
from fastnotes import _env
from fastnotes.exact import gauss_hermite
from fastnotes.reference import exact as reference

OP = "exact_loss"
BATCH, NODES, SIGMA = 256, 32, 0.5
CLASSES = [10, 100, 1000]
CONTENDERS = ["fastnotes-numba", "fastnotes-triton", "eager-composite"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BYTES_PER_ELEMENT = {"fwd": 4, "fwdbwd": 4 * 3}


def _prob_fn(contender, labels):
    if contender.startswith("fastnotes-"):
        return lambda x: fastnotes.expected_accuracy(x, labels, sigma=SIGMA, nodes=NODES)
    nodes, weights = gauss_hermite(NODES)
    sigma_rows = torch.full((BATCH,), SIGMA, device=labels.device)
    return lambda x: reference.expected_accuracy(x, labels, sigma_rows, None, nodes, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_classes", CLASSES)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("contender", CONTENDERS)
def test_exact(benchmark, device, n_classes, mode, contender):
    if skip_reason(contender, device):
        pytest.skip(skip_reason(contender, device))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, n_classes, generator=gen).to(device)
    labels = torch.randint(0, n_classes, (BATCH,), generator=gen).to(device)
    backend = backend_of(contender)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with fastnotes.use_backend(backend):
        fn = _prob_fn(contender, labels)

        def run():
            if mode == "fwd":
                with torch.no_grad():
                    fn(logits)
            else:
                x = logits.detach().requires_grad_()
                torch.autograd.grad(fn(x).sum(), x)
            sync()

        run()  # warm-up outside the timed region (numba compilation or cache load)
        benchmark.group = f"{OP} {device} {BATCH}x{n_classes} {mode}"
        benchmark.extra_info.update(
            op=OP, shape=[BATCH, n_classes], mode=mode, contender=contender, device=device,
            **_env.device_info(device), versions=_env.versions(),
            bytes=BATCH * n_classes * BYTES_PER_ELEMENT[mode], nodes=NODES, dtype="float32",
            saved_bytes=saved_bytes(fn, logits) if mode == "fwdbwd" else None,
        )
        benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
