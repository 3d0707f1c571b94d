"""Benchmarks for fastnotes.ladder_merge (LST's gated ladder, docs/lst.md) against the eager
composite a user writes, mu s + (1 - mu) F.linear(h, W, b) with mu = sigmoid(alpha / T).

    pytest bench/bench_lst.py --benchmark-json=bench/results/lst.json

Shapes: N tokens x D backbone width -> d = D / 8 side width, fp32: (8192, 768 -> 96), a T5-base-sized
ladder over 32 sequences of 256 tokens, and (16384, 1024 -> 128). fwd+bwd computes the gradients of
s, W, b and alpha (h is the frozen backbone's: no gradient), as LST training does.
Compulsory bytes: fwd reads h, s, W and writes o; fwd+bwd also reads the upstream gradient and h
again and writes ds and dW. extra_info["saved_bytes"]: what autograd keeps for the backward (the
composite also keeps z = h W^T + b for dalpha; the fused op recomputes nothing and keeps h and s).
"""
import pytest
import torch
import torch.nn.functional as F
from _shared import backend_of, saved_bytes, skip_reason

import fastnotes
from fastnotes import _env

OP = "ladder_merge"
SHAPES = [(8192, 768, 96), (16384, 1024, 128)]
TEMPERATURE = 0.1
CONTENDERS = ["fastnotes-numba", "fastnotes-triton", "eager-composite"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _composite(s, h, weight, bias, alpha):
    mu = torch.sigmoid(alpha / TEMPERATURE)
    return mu * s + (1 - mu) * F.linear(h, weight, bias)


def _fused(s, h, weight, bias, alpha):
    return fastnotes.ladder_merge(s, h, weight, bias, alpha, temperature=TEMPERATURE)


def _compulsory_bytes(n, dim, side, mode):
    fwd = 4 * (n * dim + 2 * n * side + side * dim)
    return fwd if mode == "fwd" else fwd + 4 * (n * dim + 2 * n * side + side * dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("contender", CONTENDERS)
def test_ladder_merge(benchmark, device, shape, mode, contender):
    if skip_reason(contender, device):
        pytest.skip(skip_reason(contender, device))
    n, dim, side = shape
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=gen).to(device)
    s = torch.randn(n, side, generator=gen).to(device)
    weight = (torch.randn(side, dim, generator=gen) / dim ** 0.5).to(device)
    bias = torch.randn(side, generator=gen).to(device)
    alpha = torch.tensor(0.3, device=device)
    grad_out = torch.randn(n, side, generator=gen).to(device)
    fn = _composite if contender == "eager-composite" else _fused
    backend = backend_of(contender)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with fastnotes.use_backend(backend):

        def run():
            if mode == "fwd":
                with torch.no_grad():
                    fn(s, h, weight, bias, alpha)
            else:
                leaves = [x.detach().requires_grad_() for x in (s, weight, bias, alpha)]
                out = fn(leaves[0], h, *leaves[1:])
                torch.autograd.grad(out, leaves, grad_out)
            sync()

        run()  # warm-up outside the timed region (numba compilation or cache load)
        benchmark.group = f"{OP} {device} {n}x{dim}->{side} {mode}"
        benchmark.extra_info.update(
            op=OP, shape=[n, dim, side], mode=mode, contender=contender, device=device,
            **_env.device_info(device), versions=_env.versions(), dtype="float32",
            bytes=_compulsory_bytes(n, dim, side, mode),
            saved_bytes=(saved_bytes(lambda s_, w_, b_, a_: fn(s_, h, w_, b_, a_), s, weight, bias, alpha)
                         if mode == "fwdbwd" else None),
        )
        benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
