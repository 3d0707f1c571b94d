"""Benchmarks for fastnotes.global_pointer_loss (GlobalPointer + ZLPR, fused), forward + backward,
float32, RoPE and tril on, 8 spans per (sample, type), the last quarter of the second sample padded,
at (B, n, H, d) in SHAPES, against:
  eager-composite     the PyTorch ports' formulation (GlobalPointer_pytorch, GPLinker_pytorch): RoPE
                      through bert4keras's sinusoidal table, the [B, H, n, n] scores by einsum, padding
                      and the lower triangle pushed down by 1e12, / sqrt(d), then bert4keras's dense
                      multilabel_categorical_crossentropy over the flattened n^2 scores (the dense
                      [B, H, n, n] labels are an input, built outside the timed region)
  compiled-composite  the same function under torch.compile (inductor)

    pytest bench/bench_global_pointer.py --benchmark-json=bench/results/global_pointer.json
    python bench/bench_global_pointer.py summary bench/results/global_pointer.json

Memory: extra_info["peak_extra_bytes"] is the peak resident memory of one forward + backward above
the resident memory before it (inputs and labels already built), measured in a fresh subprocess per
contender and shape (after a warm-up call at the same shape: numba's cache load and torch.compile
are not counted), gradients included; on CUDA, torch.cuda.max_memory_allocated above the start.
extra_info["scores_bytes"] = 4 B H n^2, the float32 scores alone, which every composite holds at
least once. The composites at (2, 2048, 50, 64) need several copies of 1.68 GB of scores (more than
this shared machine can spare): they are skipped there, and the summary estimates their peak as
the bytes per score element measured at the largest shape they ran times 4 B H n^2.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from _shared import PeakRss, backend_of, skip_reason

import fastnotes
from fastnotes import _env
from fastnotes.reference.global_pointer import span_targets
from fastnotes.reference.zlpr import multilabel_ce_composite

OP = "global_pointer_loss"
SHAPES = [(16, 512, 10, 64), (8, 128, 1000, 64), (2, 2048, 50, 64)]
SPANS_PER_ROW = 8
CONTENDERS = ["fastnotes-numba", "fastnotes-triton", "eager-composite", "compiled-composite"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COMPOSITE_LIMIT = 1 << 30  # skip a composite whose scores alone exceed this many bytes (1 GiB)


def make_inputs(shape, device, dtype=torch.float32, seed=0):
    """q, k [B, n, H, d], spans [B, H, P, 2], mask [B, n] (sample 1 loses its last quarter)."""
    batch, n, heads, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, n, heads, d, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    mask = torch.ones(batch, n, dtype=torch.bool)
    if batch > 1:
        mask[1, 3 * n // 4:] = False
    length = mask.sum(1)
    start = (torch.rand(batch, heads, SPANS_PER_ROW, generator=gen) * (length[:, None, None] - 8)).long()
    spans = torch.stack((start, start + torch.randint(0, 8, start.shape, generator=gen)), dim=-1)
    keys = spans[..., 0] * n + spans[..., 1]
    ordered, order = keys.sort(dim=-1)
    repeated = torch.cat((torch.zeros_like(ordered[..., :1], dtype=torch.bool), ordered[..., 1:] == ordered[..., :-1]),
                         dim=-1)
    spans = torch.gather(spans, 2, order[..., None].expand_as(spans)).masked_fill(repeated[..., None], -1)
    return q, k, spans.to(device), mask.to(device)


def sinusoidal(n, d, device, dtype):
    """bert4keras.backend.sinusoidal_embeddings of positions 0..n-1 (interleaved [sin, cos])."""
    theta = torch.pow(10000.0, -2 * torch.arange(d // 2, device=device, dtype=dtype) / d)
    angles = torch.arange(n, device=device, dtype=dtype)[:, None] * theta
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def composite(q, k, labels, mask):
    """The ports' GlobalPointer forward and loss (see the module docstring); labels [B, H, n, n]."""
    batch, n, heads, d = q.shape
    pos = sinusoidal(n, d, q.device, q.dtype)[None, :, None, :]
    cos, sin = pos[..., 1::2].repeat_interleave(2, -1), pos[..., ::2].repeat_interleave(2, -1)
    q2 = torch.stack((-q[..., 1::2], q[..., ::2]), -1).reshape(q.shape)
    k2 = torch.stack((-k[..., 1::2], k[..., ::2]), -1).reshape(k.shape)
    qw, kw = q * cos + q2 * sin, k * cos + k2 * sin
    logits = torch.einsum("bmhd,bnhd->bhmn", qw, kw)
    pad = mask.to(q.dtype)
    pad = pad[:, None, :, None] * pad[:, None, None, :]
    logits = logits * pad - (1 - pad) * 1e12
    logits = logits - torch.tril(torch.ones_like(logits), -1) * 1e12
    logits = logits / d ** 0.5
    return multilabel_ce_composite(logits.reshape(batch * heads, -1), labels.reshape(batch * heads, -1)).mean()


def contender_fn(contender):
    """f(q, k, spans, labels, mask) -> scalar loss."""
    if contender.startswith("fastnotes-"):
        return lambda q, k, spans, labels, mask: fastnotes.global_pointer_loss(q, k, spans, mask=mask)
    if contender == "eager-composite":
        return lambda q, k, spans, labels, mask: composite(q, k, labels, mask)
    if contender == "compiled-composite":
        compiled = torch.compile(composite)
        return lambda q, k, spans, labels, mask: compiled(q, k, labels, mask)
    raise ValueError(contender)


def labels_for(contender, spans, n, dtype):
    """The dense labels the composites read (None for fastnotes, which takes the spans)."""
    if contender.startswith("fastnotes-"):
        return None
    return span_targets(spans, n).reshape(spans.shape[0], spans.shape[1], n, n).to(dtype)


def _skip_reason(contender, device, shape):
    if skip_reason(contender, device):
        return skip_reason(contender, device)
    batch, n, heads, _ = shape
    if not contender.startswith("fastnotes-") and 4 * batch * heads * n * n > COMPOSITE_LIMIT:
        return f"the composite's scores alone are {4 * batch * heads * n * n / 2**30:.1f} GiB (several copies needed)"
    return None


def _step(fn, q, k, spans, labels, mask):
    leaves = [q.detach().requires_grad_(), k.detach().requires_grad_()]
    torch.autograd.grad(fn(*leaves, spans, labels, mask), leaves)


# ---- peak memory in a fresh subprocess ------------------------------------------------------------

def peak_memory_one(contender, shape, device):
    with fastnotes.use_backend(backend_of(contender)):
        fn = contender_fn(contender)
        q, k, spans, mask = make_inputs(shape, device)
        labels = labels_for(contender, spans, shape[1], q.dtype)
        _step(fn, q, k, spans, labels, mask)  # warm-up at this shape: numba cache, torch.compile
        if device == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _step(fn, q, k, spans, labels, mask)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        with PeakRss() as rss:
            _step(fn, q, k, spans, labels, mask)
        return rss.peak - rss.before


def peak_memory(contender, shape, device):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, __file__, "memory-one", contender, ",".join(map(str, shape)), device],
                            capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


# ---- the benchmark --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("contender", CONTENDERS)
def test_global_pointer(benchmark, device, shape, contender):
    reason = _skip_reason(contender, device, shape)
    if reason:
        pytest.skip(reason)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    q, k, spans, mask = make_inputs(shape, device)
    labels = labels_for(contender, spans, shape[1], q.dtype)
    batch, n, heads, d = shape
    with fastnotes.use_backend(backend_of(contender)):
        fn = contender_fn(contender)

        def run():
            _step(fn, q, k, spans, labels, mask)
            sync()

        run()  # warm-up outside the timed region (numba cache load, torch.compile)
        benchmark.group = f"{OP} {device} B,n,H,d={shape} fwdbwd"
        benchmark.extra_info.update(
            op=OP, shape=list(shape), mode="fwdbwd", contender=contender, device=device,
            **_env.device_info(device), versions=_env.versions(), dtype="float32", load=os.getloadavg(),
            scores_bytes=4 * batch * heads * n * n,
            peak_extra_bytes=peak_memory(contender, shape, device),
        )
        benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)


# ---- the GPU headline: bf16 at (16, 512, 10, 64), the Triton kernels vs the dense composite ------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("contender", ["fastnotes-triton", "eager-composite", "compiled-composite"])
def test_global_pointer_gpu_target(benchmark, contender):
    shape = SHAPES[0]
    q, k, spans, mask = make_inputs(shape, "cuda", torch.bfloat16)
    labels = labels_for(contender, spans, shape[1], q.dtype)
    with fastnotes.use_backend(backend_of(contender)):
        fn = contender_fn(contender)

        def run():
            _step(fn, q, k, spans, labels, mask)
            torch.cuda.synchronize()

        run()  # warm-up: Triton compile, torch.compile
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        benchmark.group = f"{OP} cuda B,n,H,d={shape} bf16 fwdbwd"
        benchmark.extra_info.update(op=OP + "-gpu-target", shape=list(shape), mode="fwdbwd", contender=contender,
                                    device="cuda", **_env.device_info("cuda"), versions=_env.versions(),
                                    dtype="bfloat16", peak_extra_bytes=torch.cuda.max_memory_allocated() - start)
        benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)


# ---- summary for BENCHMARKS.md --------------------------------------------------------------------

def summary(path):
    """The issue's CPU "Done when" figures from one results file."""
    with open(path) as f:
        rows = [b for b in json.load(f)["benchmarks"] if b.get("extra_info", {}).get("op") == OP]
    by = {(r["extra_info"]["contender"], tuple(r["extra_info"]["shape"])): r for r in rows}
    per_element = max((r["extra_info"]["peak_extra_bytes"] / r["extra_info"]["scores_bytes"] * 4
                       for r in rows if r["extra_info"]["contender"] == "eager-composite"), default=None)
    ms = lambda r: f"{r['stats']['median'] * 1e3:.0f}" if r else "skipped"  # noqa: E731
    mib = lambda r: f"{r['extra_info']['peak_extra_bytes'] / 2**20:.0f}" if r else "skipped"  # noqa: E731
    lines = ["| B, n, H, d | fused ms | composite ms | compiled ms | vs composite | vs compiled | fused peak MiB "
             "| composite peak MiB | compiled peak MiB | fused / composite memory |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in SHAPES:
        fused, comp, comp_c = (by.get((c, shape)) for c in ("fastnotes-numba", "eager-composite", "compiled-composite"))
        if not fused:
            continue
        speed = lambda other: f"{other['stats']['median'] / fused['stats']['median']:.2f}x" if other else "n/a"  # noqa: E731
        if comp:
            comp_mib, ratio = mib(comp), f"1/{comp['extra_info']['peak_extra_bytes'] / fused['extra_info']['peak_extra_bytes']:.0f}"
        elif per_element:
            estimate = per_element * fused["extra_info"]["scores_bytes"] / 4
            comp_mib = f"~{estimate / 2**20:.0f} (est.)"
            ratio = f"~1/{estimate / fused['extra_info']['peak_extra_bytes']:.0f} (est.)"
        else:
            comp_mib, ratio = "skipped", "n/a"
        lines.append(f"| {', '.join(map(str, shape))} | {ms(fused)} | {ms(comp)} | {ms(comp_c)} | {speed(comp)} | "
                     f"{speed(comp_c)} | {mib(fused)} | {comp_mib} | {mib(comp_c)} | {ratio} |")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "memory-one":
        print(peak_memory_one(sys.argv[2], tuple(int(x) for x in sys.argv[3].split(",")), sys.argv[4]))
    elif sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)
