"""GPU benchmark of exact k-occurrence (hubness): fastnotes' cuda and triton kernels against
torch cdist + topk (the composite people write) and faiss-gpu when it is installed. Skipped without a
CUDA device.

    pytest bench/bench_hubness_gpu.py --benchmark-json=bench/results/gpu_hubness.json
    python bench/report.py bench/results/gpu_hubness.json --out BENCHMARKS.md

Contenders, on the same float32 points (queries = references, self excluded):
    fastnotes-cuda     hubness.k_occurrence on the cuda backend: Triton value-key tiles + CUDA C++ top-k merge,
                       then the exact re-ranking of k + 8 candidates (fastnotes/hubness/_exact.py)
    fastnotes-triton   the same on the triton backend: the same tiles, torch.topk merge
    torch-cdist-topk   cdist(x_block, x)^2 in 8192-row blocks, diagonal to +inf, topk, scatter_add
    faiss-gpu          GpuIndexFlatL2 search of k + 1 (host numpy in and out), self dropped, bincount
Each timed call ends with torch.cuda.synchronize(). FLOP count: 2 n^2 d (the distance GEMM).
"""
import time

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import fastnotes
from fastnotes import _env

OP = "k_occurrence_gpu"
CASES = [(10000, 512, 5), (20000, 128, 10), (100000, 128, 10)]  # (n, d, k); Su's operating point first
CONTENDERS = ["fastnotes-cuda", "fastnotes-triton", "torch-cdist-topk", "faiss-gpu"]
BLOCK_ROWS = 8192
MIN_ROUNDS, MAX_ROUNDS, ROUND_BUDGET_S = 3, 10, 3.0


def torch_cdist_topk(x, k):
    n = x.shape[0]
    counts = torch.zeros(n, dtype=torch.int64, device=x.device)
    for start in range(0, n, BLOCK_ROWS):
        block = torch.cdist(x[start:start + BLOCK_ROWS], x).pow_(2)
        rows = torch.arange(block.shape[0], device=x.device)
        block[rows, start + rows] = float("inf")
        indices = torch.topk(block, k, dim=1, largest=False).indices.reshape(-1)
        counts.scatter_add_(0, indices, torch.ones_like(indices))
    return counts


def faiss_gpu(x, k):
    import faiss

    index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), x.shape[1])
    points = x.cpu().numpy()
    index.add(points)
    _, indices = index.search(points, k + 1)
    indices = torch.from_numpy(indices)
    is_self = (indices == torch.arange(x.shape[0])[:, None]).to(torch.int8)  # self moved last, then cut
    kept = indices.gather(1, torch.argsort(is_self, dim=1, stable=True))[:, :k]
    return torch.bincount(kept.reshape(-1), minlength=x.shape[0])


def _runner(contender, x, k):
    if contender in ("fastnotes-cuda", "fastnotes-triton"):
        backend = contender.split("-")[1]

        def call():
            with fastnotes.use_backend(backend):
                return fastnotes.hubness.k_occurrence(x, k)

        return call
    if contender == "torch-cdist-topk":
        return lambda: torch_cdist_topk(x, k)
    if contender == "faiss-gpu":
        pytest.importorskip("faiss")
        return lambda: faiss_gpu(x, k)
    raise ValueError(contender)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"n{c[0]}-d{c[1]}-k{c[2]}")
def points(request):
    n, d, k = request.param
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).cuda()
    yield n, d, k, x
    del x


@pytest.mark.parametrize("contender", CONTENDERS)
def test_k_occurrence_gpu(benchmark, points, contender):
    n, d, k, x = points
    if contender == "fastnotes-cuda":
        pytest.importorskip("fastnotes._C")
    if contender == "torch-cdist-topk" and n > 50000:
        pytest.skip("cdist + topk over 8192-row blocks: minutes at this size")
    call = _runner(contender, x, k)

    def run():
        call()
        torch.cuda.synchronize()

    run()  # warm-up: Triton compilation, faiss index set-up
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    call_s = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUND_BUDGET_S / max(call_s, 1e-6))))
    benchmark.group = f"{OP} cuda n={n} d={d} k={k}"
    benchmark.extra_info.update(
        op=OP, shape=[n, d], k=k, mode="fwd", contender=contender, device="cuda",
        **_env.device_info("cuda"), versions=_env.versions(), flops=2 * n * n * d, bytes=2 * n * d * 4,
        peak_memory_bytes=torch.cuda.max_memory_allocated(), dtype="float32",
    )
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
