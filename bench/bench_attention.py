"""Benchmarks for fastnotes.relpos_attention with a T5 bucket bias (32 buckets, bidirectional) and
URPE (a post-softmax table), B = 4, H = 8, D = 64, L in {512, 1024, 2048}, fp32, forward and
forward + backward, against:
  eager-composite   the naive composite users write: materialise the bias [H, L, L], softmax, multiply
                    by C [H, L, L] after it, then @ v (same math as fastnotes)
  sdpa-float-bias   F.scaled_dot_product_attention with the materialised bias as attn_mask
                    (pre-softmax only: no URPE, so less work than the op)
  sdpa-no-bias      F.scaled_dot_product_attention without any bias (the floor)
  flex-attention    torch.compile(flex_attention) with the T5 table as score_mod (pre-softmax only);
                    forward only: its CPU backward raises NotImplementedError (torch 2.13)

    pytest bench/bench_attention.py --benchmark-json=bench/results/attention.json
    python bench/bench_attention.py summary bench/results/attention.json   # the issue's "Done when" lines

Memory: extra_info["saved_bytes"] is what autograd keeps for the backward (saved-tensor hooks);
extra_info["peak_extra_bytes"] (fwd+bwd) is the peak resident memory of one forward + backward
above the resident memory before it, measured in a fresh subprocess per contender and length
(heap handed back with malloc_trim first, VmHWM reset through /proc/self/clear_refs, RSS also polled
every millisecond), gradients included. On CUDA it is torch.cuda.max_memory_allocated above the start.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _shared import PeakRss, backend_of, saved_bytes, skip_reason

import fastnotes
from fastnotes import _env
from fastnotes.reference.attention import relative_distance, table_index

OP = "relpos_attention"
BATCH, HEADS, DIM, BUCKETS = 4, 8, 64, 32
RELB = (BUCKETS, 128, True)
LENGTHS = [512, 1024, 2048]
CONTENDERS = ["fastnotes-numba", "fastnotes-triton", "eager-composite", "sdpa-float-bias", "sdpa-no-bias",
              "flex-attention"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(length, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, length, DIM, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    table = (torch.randn(HEADS, BUCKETS, generator=gen) * 0.5).to(device)
    post = (1 + 0.1 * torch.randn(HEADS, BUCKETS, generator=gen)).to(device)
    return q, k, v, table, post


def contender_fn(contender, length, device):
    """f(q, k, v, table, post) -> output, differentiable in all five where the contender uses them."""
    index = table_index(relative_distance(length, length, device), BUCKETS, RELB)
    scale = DIM ** -0.5
    if contender.startswith("fastnotes-"):
        return lambda q, k, v, t, c: fastnotes.relpos_attention(q, k, v, rel_bias=t, rel_buckets=RELB, post_table=c)
    if contender == "eager-composite":
        def composite(q, k, v, t, c):
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale + t[:, index].to(q.dtype)
            return torch.matmul(torch.softmax(scores, dim=-1) * c[:, index].to(q.dtype), v)
        return composite
    if contender == "sdpa-float-bias":
        return lambda q, k, v, t, c: F.scaled_dot_product_attention(q, k, v, attn_mask=t[:, index].to(q.dtype))
    if contender == "sdpa-no-bias":
        return lambda q, k, v, t, c: F.scaled_dot_product_attention(q, k, v)
    if contender == "flex-attention":
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention)

        def flex(q, k, v, t, c):
            return compiled(q, k, v, score_mod=lambda score, b, h, qi, ki: score + t[h, index[qi, ki]])
        return flex
    raise ValueError(contender)


def _skip_reason(contender, device, mode):
    if skip_reason(contender, device):
        return skip_reason(contender, device)
    if contender == "flex-attention" and device == "cpu" and mode == "fwdbwd":
        return "FlexAttention has no CPU backward (NotImplementedError in torch 2.13)"
    return None


def _step(fn, inputs, mode):
    if mode == "fwd":
        with torch.no_grad():
            fn(*inputs)
    else:
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = fn(*leaves)
        torch.autograd.grad(out.sum(), leaves, allow_unused=True)  # sdpa does not use the tables


# ---- peak memory in a fresh subprocess ------------------------------------------------------------

def peak_memory_one(contender, length, device):
    """Runs in the subprocess: warm up at a small length (compilation), then one fwd+bwd."""
    with fastnotes.use_backend(backend_of(contender)):
        _step(contender_fn(contender, 64, device), make_inputs(64, device), "fwdbwd")
        fn = contender_fn(contender, length, device)
        inputs = make_inputs(length, device)
        if device == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _step(fn, inputs, "fwdbwd")
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        with PeakRss() as rss:
            _step(fn, inputs, "fwdbwd")
        return rss.peak - rss.before


def peak_memory(contender, length, device):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, __file__, "memory-one", contender, str(length), device],
                            capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


# ---- the benchmark --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("contender", CONTENDERS)
def test_attention(benchmark, device, length, mode, contender):
    reason = _skip_reason(contender, device, mode)
    if reason:
        pytest.skip(reason)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inputs = make_inputs(length, device)
    with fastnotes.use_backend(backend_of(contender)):
        fn = contender_fn(contender, length, device)

        def run():
            _step(fn, inputs, mode)
            sync()

        run()  # warm-up outside the timed region (numba cache load, torch.compile)
        n = BATCH * HEADS * length
        benchmark.group = f"{OP} {device} L={length} {mode}"
        benchmark.extra_info.update(
            op=OP, shape=[BATCH, HEADS, length, DIM], mode=mode, contender=contender, device=device,
            **_env.device_info(device), versions=_env.versions(), dtype="float32",
            bias="t5 32 buckets" + (" + URPE" if contender in ("fastnotes-numba", "fastnotes-triton",
                                                              "eager-composite") else ""),
            # compulsory traffic: read q, k, v, write o (fwd); plus read o, dO, write dq, dk, dv (bwd)
            bytes=n * DIM * 4 * (4 if mode == "fwd" else 9),
            saved_bytes=saved_bytes(fn, *inputs) if mode == "fwdbwd" else None,
            peak_extra_bytes=peak_memory(contender, length, device) if mode == "fwdbwd" else None,
        )
        benchmark.pedantic(run, rounds=3 if length >= 2048 else 5, warmup_rounds=1, iterations=1)


# ---- the GPU target: bf16, L = 4096, URPE on, vs SDPA flash without bias ------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("contender", ["fastnotes-triton", "sdpa-flash-no-bias"])
def test_attention_gpu_target(benchmark, contender):
    length = 4096
    inputs = make_inputs(length, "cuda", torch.bfloat16)
    if contender == "sdpa-flash-no-bias":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn(q, k, v, t, c):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
    else:
        fn = contender_fn(contender, length, "cuda")

    def run():
        with fastnotes.use_backend(backend_of(contender)):
            _step(fn, inputs, "fwdbwd")
        torch.cuda.synchronize()

    run()
    benchmark.group = f"{OP} cuda L={length} bf16 fwdbwd"
    benchmark.extra_info.update(op=OP + "-gpu-target", shape=[BATCH, HEADS, length, DIM], mode="fwdbwd",
                                contender=contender, device="cuda", **_env.device_info("cuda"),
                                versions=_env.versions(), dtype="bfloat16")
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)


# ---- summary for BENCHMARKS.md --------------------------------------------------------------------

def summary(path):
    """The issue's CPU "Done when" figures from one results file."""
    with open(path) as f:
        rows = [b for b in json.load(f)["benchmarks"] if b.get("extra_info", {}).get("op") == OP]
    by = {(r["extra_info"]["contender"], r["extra_info"]["shape"][2], r["extra_info"]["mode"]): r for r in rows}
    lines = ["| L | mode | fastnotes-numba ms | eager-composite ms | speed-up | sdpa-float-bias ms | sdpa-no-bias ms "
             "| flex ms | fused peak MiB | composite peak MiB | memory ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for length in LENGTHS:
        for mode in ("fwd", "fwdbwd"):
            get = lambda c: by.get((c, length, mode))  # noqa: E731
            fused, comp = get("fastnotes-numba"), get("eager-composite")
            if not fused or not comp:
                continue
            ms = lambda r: f"{r['stats']['median'] * 1e3:.0f}" if r else "n/a"  # noqa: E731
            mib = lambda r: (f"{r['extra_info']['peak_extra_bytes'] / 2**20:.0f}"  # noqa: E731
                             if r and r["extra_info"].get("peak_extra_bytes") is not None else "n/a")
            ratio = ""
            if fused["extra_info"].get("peak_extra_bytes") and comp["extra_info"].get("peak_extra_bytes"):
                ratio = f"1/{comp['extra_info']['peak_extra_bytes'] / fused['extra_info']['peak_extra_bytes']:.1f}"
            lines.append(f"| {length} | {mode} | {ms(fused)} | {ms(comp)} | "
                         f"{comp['stats']['median'] / fused['stats']['median']:.2f}x | {ms(get('sdpa-float-bias'))} | "
                         f"{ms(get('sdpa-no-bias'))} | {ms(get('flex-attention'))} | {mib(fused)} | {mib(comp)} | {ratio} |")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "memory-one":
        print(peak_memory_one(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    elif sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)
