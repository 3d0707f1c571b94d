"""Benchmarks for fastnotes.multilabel_ce (ZLPR) against the composites people use today.

    pytest bench/bench_zlpr.py --benchmark-json=bench/results/cpu.json
    python bench/report.py bench/results/cpu.json --out BENCHMARKS.md --plot bench/zlpr_cpu.png

Contenders, all on the same logits/targets tensors per (device, shape):
    fastnotes-numba   fastnotes.multilabel_ce under use_backend("numba")   (CPU tensors)
    fastnotes-numba-fresh  the same with FASTNOTES_REUSE_BUFFERS=0: a fresh gradient buffer (and
                      its page faults) every call, as every other contender pays
    fastnotes-triton  fastnotes.multilabel_ce under use_backend("triton")  (CUDA tensors only)
    eager-composite   reference.multilabel_ce_composite(...).mean(): bert4keras 1e12 form
    torch-compile     the same composite under torch.compile(dynamic=False)
    bce-with-logits   F.binary_cross_entropy_with_logits, for scale (a different, simpler loss)
Modes: "fwd" (under no_grad) and "fwdbwd" (forward + torch.autograd.grad of the mean loss).
CPU runs on every machine; CUDA is added when torch sees a GPU. Each benchmark is one
benchmark.pedantic call whose timed function is the op only (plus a synchronize on CUDA).
"""
import os
import tempfile
import time

# The numba kernels use cache=True. Keep this process's cache apart from the source tree's
# __pycache__ (shared with test runs, which may hold entries written under another module name).
# Compilation happens in the warm-up call, outside the timed region. Set NUMBA_CACHE_DIR to override.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastnotes-bench-numba-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _shared import backend_of, skip_reason  # noqa: E402

import fastnotes  # noqa: E402
from fastnotes import _env  # noqa: E402
from fastnotes.reference import multilabel_ce_composite  # noqa: E402

OP = "multilabel_ce"
SHAPES = [(4096, 1000), (512, 50000), (64, 500000)]
MODES = ["fwd", "fwdbwd"]
CONTENDERS = ["fastnotes-numba", "fastnotes-numba-fresh", "fastnotes-triton", "eager-composite", "torch-compile", "bce-with-logits"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
POSITIVE_RATE = 0.01
LOGIT_SCALE = 3.0
# Rounds per benchmark follow the warm-up call's time: ~ROUND_BUDGET_S of timed calls, within bounds.
MIN_ROUNDS, MAX_ROUNDS, ROUND_BUDGET_S = 3, 10, 1.5
# Compulsory bytes per element: fwd reads logits + targets (2 x fp32); fwd+bwd reads them again
# and writes the fp32 gradient.
BYTES_PER_ELEMENT = {"fwd": 4 * 2, "fwdbwd": 4 * 5}

# torch.compile specialises per shape, device and grad mode (2 x 3 x 2 = 12 graphs on a GPU machine),
# above dynamo's default of 8 recompiles per function; past the limit it would silently run eager.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.fail_on_recompile_limit_hit = True


def _composite_mean(logits, targets):
    return multilabel_ce_composite(logits, targets).mean()


_compiled_composite = torch.compile(_composite_mean, dynamic=False)


@pytest.fixture(scope="module", params=[(d, s) for d in DEVICES for s in SHAPES],
                ids=lambda p: f"{p[0]}-{p[1][0]}x{p[1][1]}")
def inputs(request):
    """(device, shape, logits, targets), built once per (device, shape): module scope makes pytest
    run every mode and contender of one shape before building the next."""
    device, (n, c) = request.param
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, c, generator=gen) * LOGIT_SCALE).to(device)
    targets = (torch.rand(n, c, generator=gen) < POSITIVE_RATE).to(torch.float32).to(device)
    logits.requires_grad_(True)  # a leaf; fwd runs under no_grad, fwdbwd takes autograd.grad of it
    yield device, (n, c), logits, targets
    del logits, targets


def _loss_fn(contender, targets):
    if contender.startswith("fastnotes-"):
        return lambda x: fastnotes.multilabel_ce(x, targets)
    if contender == "eager-composite":
        return lambda x: _composite_mean(x, targets)
    if contender == "torch-compile":
        return lambda x: _compiled_composite(x, targets)
    if contender == "bce-with-logits":
        return lambda x: F.binary_cross_entropy_with_logits(x, targets)
    raise ValueError(contender)


def _timed_fn(loss_fn, logits, mode, device):
    """The timed call. It returns nothing: like a training step, it lets go of the loss and the
    gradient before the next call (pytest-benchmark would otherwise hold the last result)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                loss_fn(logits)
            sync()
    else:
        def run():
            torch.autograd.grad(loss_fn(logits), logits)
            sync()
    return run


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", MODES)
def test_multilabel_ce(benchmark, inputs, mode, contender, monkeypatch):
    device, (n, c), logits, targets = inputs
    if skip_reason(contender, device):
        pytest.skip(skip_reason(contender, device))
    if contender == "fastnotes-numba-fresh":
        monkeypatch.setenv("FASTNOTES_REUSE_BUFFERS", "0")
    backend = backend_of(contender)

    with fastnotes.use_backend(backend):
        run = _timed_fn(_loss_fn(contender, targets), logits, mode, device)
        # Warm-up outside the timed region: compiles torch.compile's graph for this shape and grad
        # mode and JITs (or loads) the numba kernels. The second call's time sets the round count.
        run()
        start = time.perf_counter()
        run()
        call_s = time.perf_counter() - start
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(call_s, 1e-6))))

        benchmark.group = f"{OP} {device} {n}x{c} {mode}"
        benchmark.extra_info.update(
            op=OP, shape=[n, c], mode=mode, contender=contender, device=device,
            **_env.device_info(device), versions=_env.versions(), bytes=n * c * BYTES_PER_ELEMENT[mode],
            positive_rate=POSITIVE_RATE, dtype="float32",
        )
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
