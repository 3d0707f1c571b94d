"""Benchmarks for ZLPR at extreme label counts (issue 3): the fused linear + ZLPR head and sparse
positives.

    pytest bench/bench_zlpr_extreme.py --benchmark-json=bench/results/zlpr_extreme.json
    python bench/report.py bench/results/zlpr_extreme.json --out BENCHMARKS.md
    python bench/bench_zlpr_extreme.py memory [C ...]  # peak extra memory table (Markdown)
FASTNOTES_BENCH_LABELS=32768,131072 limits the label counts of the pytest run (each C = 524 288 call
takes ~10 minutes here); FASTNOTES_BENCH_CONTENDERS=a,b limits the memory run's contenders.

fused_linear_multilabel_ce, N = 4096 rows, D = 1024, C in {32 768, 131 072, 524 288}, fp32, fwd+bwd
(forward, then torch.autograd.grad for hidden, weight and bias), 10 positives per row:
    fastnotes-numba         fused_linear_multilabel_ce with the dense bool targets the composites get
    fastnotes-numba-sparse  the same with pos_index [N, 10]
    eager-composite         F.linear + fastnotes.multilabel_ce (numba): materialised [N, C] logits
    bce-with-logits         F.linear + F.binary_cross_entropy_with_logits, for scale
At C = 524 288 one [N, C] float32 buffer is 8 GiB and the composites hold at least two (logits and
their gradient) plus the targets, more than this 24 GiB machine can give: they are skipped there.

sparse_multilabel_ce, 64 x 500 000, K = 10 positives per row (no padding), fp32:
    fastnotes-numba         sparse_multilabel_ce(logits, pos_index)
    fastnotes-numba-dense   multilabel_ce(logits, dense bool targets)
    eager-composite         bert4keras's sparse form (all minus positives) in torch
    bce-with-logits         BCEWithLogits on dense float targets

Peak extra memory ("memory" mode): each (op, contender, C) runs once in a fresh subprocess, after a
small warm-up call there (numba kernels loaded, BLAS initialised); the inputs are built, freed heap
memory is handed back (malloc_trim), then the resident set size is polled every millisecond during the forward + backward (and VmHWM, reset
before the call through /proc/self/clear_refs, is folded in): peak minus the RSS before the call is
the extra memory the step needed, gradients included.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastnotes-bench-numba-cache"))

import pytest
import torch
import torch.nn.functional as F
from _shared import PeakRss

import fastnotes
from fastnotes import _env

FUSED_OP = "fused_linear_multilabel_ce"
SPARSE_OP = "sparse_multilabel_ce"
N_ROWS, DIM, POSITIVES = 4096, 1024, 10
LABELS = [int(c) for c in os.environ.get("FASTNOTES_BENCH_LABELS", "32768,131072,524288").split(",")]
COMPOSITE_MAX_LABELS = 131072  # above: the composites need more memory than the machine has
FUSED_CONTENDERS = ["fastnotes-numba", "fastnotes-numba-sparse", "eager-composite", "bce-with-logits"]
SPARSE_SHAPE = (64, 500000)
SPARSE_CONTENDERS = ["fastnotes-numba", "fastnotes-numba-dense", "eager-composite", "bce-with-logits"]


def _positives(n_rows, n_classes, gen):
    """[n_rows, POSITIVES] distinct class indices per row."""
    return torch.stack([torch.randperm(n_classes, generator=gen)[:POSITIVES] for _ in range(n_rows)])


def fused_inputs(n_classes, n_rows=N_ROWS, dim=DIM):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_rows, dim, generator=gen).requires_grad_()
    weight = (torch.randn(n_classes, dim, generator=gen) / dim**0.5).requires_grad_()
    bias = torch.zeros(n_classes).requires_grad_()
    pos_index = _positives(n_rows, n_classes, gen)
    return hidden, weight, bias, pos_index


def fused_step(contender, hidden, weight, bias, pos_index, targets):
    """One forward + backward; returns nothing (like a training step, drops loss and grads)."""
    if contender == "fastnotes-numba":
        loss = fastnotes.fused_linear_multilabel_ce(hidden, weight, targets, bias=bias)
    elif contender == "fastnotes-numba-sparse":
        loss = fastnotes.fused_linear_multilabel_ce(hidden, weight, pos_index=pos_index, bias=bias)
    elif contender == "eager-composite":
        loss = fastnotes.multilabel_ce(F.linear(hidden, weight, bias), targets)
    elif contender == "bce-with-logits":
        loss = F.binary_cross_entropy_with_logits(F.linear(hidden, weight, bias), targets)
    else:
        raise ValueError(contender)
    torch.autograd.grad(loss, (hidden, weight, bias))


def fused_targets(contender, pos_index, n_classes):
    if contender == "fastnotes-numba-sparse":
        return None
    dtype = torch.float32 if contender == "bce-with-logits" else torch.bool
    return fastnotes.reference.positives_as_targets(pos_index, n_classes, dtype)


def _skip_reason(contender, n_classes):
    if contender in ("eager-composite", "bce-with-logits") and n_classes > COMPOSITE_MAX_LABELS:
        gib = N_ROWS * n_classes * 4 / 2**30
        return f"{contender} holds >= 2 [N, C] float32 buffers of {gib:.0f} GiB each: more than this machine has"
    return None


@pytest.fixture(scope="module", params=LABELS, ids=lambda c: f"C{c}")
def fused_case(request):
    n_classes = request.param
    hidden, weight, bias, pos_index = fused_inputs(n_classes)
    yield n_classes, hidden, weight, bias, pos_index


@pytest.mark.parametrize("contender", FUSED_CONTENDERS)
def test_fused_linear(benchmark, fused_case, contender):
    n_classes, hidden, weight, bias, pos_index = fused_case
    reason = _skip_reason(contender, n_classes)
    if reason:
        pytest.skip(reason)
    targets = fused_targets(contender, pos_index, n_classes)
    # From C = 131 072 on a call takes minutes here: one timed call, no warm-up (the kernels were
    # compiled at the smaller size; first-touch page faults are ~1% of such a call).
    big = n_classes >= 131072
    with fastnotes.use_backend("numba" if contender.startswith("fastnotes-") else None):
        run = lambda: fused_step(contender, hidden, weight, bias, pos_index, targets)
        if not big:
            run()
        benchmark.group = f"{FUSED_OP} cpu {N_ROWS}x{DIM}x{n_classes} fwdbwd"
        benchmark.extra_info.update(
            op=FUSED_OP, shape=[N_ROWS, DIM, n_classes], mode="fwdbwd", contender=contender, device="cpu",
            **_env.device_info("cpu"), versions=_env.versions(), bytes=None, dtype="float32",
            flops=3 * 2 * N_ROWS * DIM * n_classes)
        benchmark.pedantic(run, rounds=1 if big else 2, warmup_rounds=0, iterations=1)


# ---- the same sizes on a GPU (issue 3's GPU target) -------------------------------------------------

GPU_CONTENDERS = ["fastnotes-triton", "fastnotes-triton-sparse", "eager-composite", "bce-with-logits",
                  "liger-flce"]


def _liger_flce():
    """Liger-Kernel's fused linear cross-entropy (single-label: the speed reference the issue names),
    or a skip when it is not installed."""
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")
    return liger.LigerFusedLinearCrossEntropyLoss()


@pytest.fixture(scope="module", params=LABELS, ids=lambda c: f"C{c}")
def fused_case_cuda(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    hidden, weight, bias, pos_index = (t.detach().cuda() for t in fused_inputs(request.param))
    yield request.param, hidden, weight, bias, pos_index


@pytest.mark.parametrize("contender", GPU_CONTENDERS)
def test_fused_linear_cuda(benchmark, fused_case_cuda, contender):
    """fwd+bwd at N = 4096, D = 1024, fp32 on CUDA; extra_info["peak_extra_bytes"] is
    torch.cuda.max_memory_allocated during the step above what was allocated before it."""
    n_classes, hidden, weight, bias, pos_index = fused_case_cuda
    hidden, weight, bias = (t.detach().requires_grad_() for t in (hidden, weight, bias))
    if contender == "liger-flce":
        loss_fn = _liger_flce()
        labels = pos_index[:, 0].contiguous()

        def step():
            torch.autograd.grad(loss_fn(weight, hidden, labels, bias), (hidden, weight, bias))
    else:
        name = contender.replace("triton", "numba")  # fused_step's names; the backend is forced below
        targets = None if name.endswith("sparse") else fused_targets(name, pos_index, n_classes)

        def step():
            fused_step(name, hidden, weight, bias, pos_index, targets)

    def run():
        step()
        torch.cuda.synchronize()

    with fastnotes.use_backend("triton" if contender.startswith("fastnotes-") else None):
        run()  # warm-up: Triton compilation, cuBLAS handles
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() - before
        benchmark.group = f"{FUSED_OP} cuda {N_ROWS}x{DIM}x{n_classes} fwdbwd"
        benchmark.extra_info.update(
            op=FUSED_OP, shape=[N_ROWS, DIM, n_classes], mode="fwdbwd", contender=contender, device="cuda",
            **_env.device_info("cuda"), versions=_env.versions(), bytes=None, dtype="float32",
            flops=3 * 2 * N_ROWS * DIM * n_classes, peak_extra_bytes=peak)
        benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


def bert4keras_sparse(logits, pos_index):
    """bert4keras sparse_multilabel_categorical_crossentropy (no padding), ported to torch: the
    negative part as log(sum_all - sum_pos), the form that cancels when a positive dominates."""
    zeros = logits.new_zeros(logits.shape[:-1] + (1,))
    y_pred = torch.cat([logits, zeros], dim=-1)
    y_pos_2 = torch.gather(y_pred, -1, pos_index)
    y_pos_1 = torch.cat([y_pos_2, zeros], dim=-1)
    pos_loss = torch.logsumexp(-y_pos_1, dim=-1)
    all_loss = torch.logsumexp(y_pred, dim=-1)
    aux_loss = torch.logsumexp(y_pos_2, dim=-1) - all_loss
    aux_loss = torch.clamp(1 - torch.exp(aux_loss), 1e-7, 1)
    return (pos_loss + all_loss + torch.log(aux_loss)).mean()


@pytest.fixture(scope="module")
def sparse_case():
    gen = torch.Generator().manual_seed(0)
    n, c = SPARSE_SHAPE
    logits = (torch.randn(n, c, generator=gen) * 3).requires_grad_()
    pos_index = _positives(n, c, gen)
    yield logits, pos_index


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("contender", SPARSE_CONTENDERS)
def test_sparse(benchmark, sparse_case, mode, contender):
    logits, pos_index = sparse_case
    n, c = SPARSE_SHAPE
    if contender == "fastnotes-numba":
        fn = lambda x: fastnotes.sparse_multilabel_ce(x, pos_index)
    elif contender == "fastnotes-numba-dense":
        dense = fastnotes.reference.positives_as_targets(pos_index, c, torch.bool)
        fn = lambda x: fastnotes.multilabel_ce(x, dense)
    elif contender == "eager-composite":
        fn = lambda x: bert4keras_sparse(x, pos_index)
    else:
        dense_float = fastnotes.reference.positives_as_targets(pos_index, c, torch.float32)
        fn = lambda x: F.binary_cross_entropy_with_logits(x, dense_float)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(logits)
        else:
            torch.autograd.grad(fn(logits), logits)

    with fastnotes.use_backend("numba" if contender.startswith("fastnotes-") else None):
        run()
        start = time.perf_counter()
        run()
        rounds = max(3, min(10, int(1.5 / max(time.perf_counter() - start, 1e-6))))
        benchmark.group = f"{SPARSE_OP} cpu {n}x{c} {mode}"
        benchmark.extra_info.update(
            op=SPARSE_OP, shape=[n, c], mode=mode, contender=contender, device="cpu", **_env.device_info("cpu"),
            versions=_env.versions(), bytes=n * c * 4 * (1 if mode == "fwd" else 3), positives=POSITIVES,
            dtype="float32")
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)


# ---- peak extra memory, one fresh subprocess per measurement --------------------------------------


def _measure_one(contender, n_classes):
    """Runs in the subprocess: warm up small, build the inputs, reset the peak, run once."""
    with fastnotes.use_backend("numba" if contender.startswith("fastnotes-") else None):
        small = fused_inputs(256, n_rows=64, dim=32)
        fused_step(contender, *small, fused_targets(contender, small[3], 256))
        del small
        hidden, weight, bias, pos_index = fused_inputs(n_classes)
        targets = fused_targets(contender, pos_index, n_classes)
        start = time.perf_counter()
        with PeakRss() as rss:
            fused_step(contender, hidden, weight, bias, pos_index, targets)
        seconds = time.perf_counter() - start
    gradient_bytes = sum(x.numel() * x.element_size() for x in (hidden, weight, bias))
    return {"contender": contender, "n_classes": n_classes, "extra_bytes": rss.peak - rss.before,
            "gradient_bytes": gradient_bytes, "seconds": seconds}


def measure_memory(labels=LABELS, contenders=FUSED_CONTENDERS):
    rows = []
    for n_classes in labels:
        for contender in contenders:
            reason = _skip_reason(contender, n_classes)
            if reason:
                rows.append({"contender": contender, "n_classes": n_classes, "skipped": reason})
                continue
            out = subprocess.run([sys.executable, __file__, "memory-one", contender, str(n_classes)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def memory_table(rows):
    """Peak extra memory with the gradients (every contender returns the same ones) and without."""
    lines = [("| C | contender | peak extra MiB | vs eager-composite | without the gradients MiB | vs eager-composite "
              "| one call s |"), "|---:|---|---:|---:|---:|---:|---:|"]
    composite = {r["n_classes"]: r for r in rows if r["contender"] == "eager-composite" and "extra_bytes" in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n_classes']} | {r['contender']} | skipped: {r['skipped']} | | | | |")
            continue
        work = r["extra_bytes"] - r["gradient_bytes"]
        base = composite.get(r["n_classes"])
        ratio = f"{r['extra_bytes'] / base['extra_bytes']:.3f}x" if base else ""
        work_ratio = f"{work / (base['extra_bytes'] - base['gradient_bytes']):.3f}x" if base else ""
        lines.append(f"| {r['n_classes']} | {r['contender']} | {r['extra_bytes'] / 2**20:.0f} | {ratio} | "
                     f"{work / 2**20:.0f} | {work_ratio} | {r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory-one"]:
        print(json.dumps(_measure_one(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1:2] == ["memory"]:
        labels = [int(c) for c in sys.argv[2:]] or LABELS
        contenders = os.environ.get("FASTNOTES_BENCH_CONTENDERS", ",".join(FUSED_CONTENDERS)).split(",")
        results = measure_memory(labels, contenders)
        os.makedirs("bench/results", exist_ok=True)
        with open(f"bench/results/zlpr_extreme_memory_{'_'.join(map(str, labels))}.json", "w") as f:
            json.dump({"device": _env.device_info("cpu"), "versions": _env.versions(), "rows": results}, f, indent=1)
        print(memory_table(results))
    else:
        sys.exit(__doc__)
