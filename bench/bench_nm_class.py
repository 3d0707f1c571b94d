"""Benchmarks for fastnotes.nm_class_ce (the experimental "n x m classification" loss,
docs/nm_class.md) against the eager composite a user writes from the formula with log_softmax,
L1 = sum_j log(1 + sum_i t_ij (1/p_ij - 1)) with log(1/p - 1) = log(-expm1(log p)) - log p, and
against plain summed cross-entropy over the tasks (the loss it generalises, for scale).

    pytest bench/bench_nm_class.py --benchmark-json=bench/results/nm_class.json

Shapes (samples, n tasks, m classes), fp32, integer targets: (64, 512, 64), a tagging batch of 64
sequences of 512 tokens, and (16, 128, 1024). Compulsory bytes: fwd reads the logits; fwd+bwd reads
them twice and writes the gradient.
"""
import pytest
import torch
import torch.nn.functional as F
from _shared import backend_of, saved_bytes, skip_reason

import fastnotes
from fastnotes import _env

OP = "nm_class_ce"
SHAPES = [(64, 512, 64), (16, 128, 1024)]
CONTENDERS = ["fastnotes-numba", "fastnotes-triton", "eager-composite", "cross-entropy"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BYTES_PER_ELEMENT = {"fwd": 4, "fwdbwd": 4 * 3}


def _composite(logits, targets):
    logp = torch.log_softmax(logits, -1)
    log_odds = torch.log(-torch.expm1(logp)) - logp  # log(1/p - 1)
    z = torch.where(F.one_hot(targets, logits.shape[-1]).bool(), log_odds, float("-inf"))
    zero_row = torch.zeros_like(z[..., :1, :])
    return torch.logsumexp(torch.cat([z, zero_row], dim=-2), dim=-2).sum(-1).mean()


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum") / logits.shape[0]


def _loss_fn(contender):
    if contender == "eager-composite":
        return _composite
    if contender == "cross-entropy":
        return _cross_entropy
    return fastnotes.nm_class_ce


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("contender", CONTENDERS)
def test_nm_class_ce(benchmark, device, shape, mode, contender):
    if skip_reason(contender, device):
        pytest.skip(skip_reason(contender, device))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen).to(device)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=gen).to(device)
    fn = _loss_fn(contender)
    backend = backend_of(contender)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with fastnotes.use_backend(backend):

        def run():
            if mode == "fwd":
                with torch.no_grad():
                    fn(logits, targets)
            else:
                x = logits.detach().requires_grad_()
                torch.autograd.grad(fn(x, targets), x)
            sync()

        run()  # warm-up outside the timed region (numba compilation or cache load)
        benchmark.group = f"{OP} {device} {'x'.join(map(str, shape))} {mode}"
        benchmark.extra_info.update(
            op=OP, shape=list(shape), mode=mode, contender=contender, device=device,
            **_env.device_info(device), versions=_env.versions(), dtype="float32",
            bytes=logits.numel() * BYTES_PER_ELEMENT[mode],
            saved_bytes=saved_bytes(lambda x: fn(x, targets), logits) if mode == "fwdbwd" else None,
        )
        benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
