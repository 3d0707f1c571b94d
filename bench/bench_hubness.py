"""Benchmarks for fastnotes.hubness.k_occurrence on the CPU (N_k with self excluded, float32) against
what users run today: faiss-cpu IndexFlatL2 (search k + 1, drop the first column, bincount),
scikit-learn brute-force NearestNeighbors (kneighbors() with self excluded, bincount) and torch
cdist + topk in blocks of 2048 queries. n in {20 000, 100 000}, d in {128, 512}, k = 10.

    pytest bench/bench_hubness.py --benchmark-json=bench/results/hubness.json
    HUBNESS_BENCH_SIZES=100000 HUBNESS_BENCH_DIMS=128 pytest bench/bench_hubness.py ...   # one case

A single faiss call at n = 100 000, d = 128 takes ~24 s here, so every case runs one round, no
warm-up, after the numba compile (BENCH_ROUNDS sets the rounds); sklearn and torch run at n = 20 000
only (~50 s each at 100 000). FLOP count: 2 n^2 d (the distance GEMM).

Memory: extra_info["peak_rss_bytes"] is the peak resident-set growth during the timed call (RSS
sampled every 2 ms by a thread), i.e. what the call allocates on top of its input. extra_info
["agree"] is the share of points whose count equals faiss's (ties and near-ties aside, 1.0).
"""
import os
import threading
import time

import numpy as np
import pytest
import torch

import fastnotes
from fastnotes import _env

OP = "k_occurrence"
K = 10
SIZES = [int(s) for s in os.environ.get("HUBNESS_BENCH_SIZES", "20000,100000").split(",")]
DIMS = [int(s) for s in os.environ.get("HUBNESS_BENCH_DIMS", "128,512").split(",")]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1"))
CONTENDERS = ["faiss-cpu", "fastnotes-numba", "sklearn-brute", "torch-cdist-topk"]
SMALL_ONLY = {"sklearn-brute", "torch-cdist-topk"}
_data = {}
_faiss_counts = {}


def _points(n, d):
    if (n, d) not in _data:
        _data.clear()
        _data[(n, d)] = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d))
    return _data[(n, d)]


def faiss_counts(x, k):
    import faiss

    xn = x.numpy()
    index = faiss.IndexFlatL2(xn.shape[1])
    index.add(xn)
    _, indices = index.search(xn, k + 1)
    return np.bincount(indices[:, 1:].ravel(), minlength=xn.shape[0])


def sklearn_counts(x, k):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x.numpy())
    return np.bincount(nn.kneighbors(return_distance=False).ravel(), minlength=x.shape[0])


def torch_counts(x, k, block=2048):
    counts = torch.zeros(x.shape[0], dtype=torch.int64)
    for q0 in range(0, x.shape[0], block):
        dist = torch.cdist(x[q0:q0 + block], x).pow_(2)
        rows = torch.arange(dist.shape[0])
        dist[rows, q0 + rows] = float("inf")
        counts += torch.bincount(dist.topk(k, largest=False).indices.reshape(-1), minlength=x.shape[0])
    return counts.numpy()


RUNNERS = {
    "fastnotes-numba": lambda x, k: fastnotes.hubness.k_occurrence(x, k).numpy(),
    "faiss-cpu": faiss_counts,
    "sklearn-brute": sklearn_counts,
    "torch-cdist-topk": torch_counts,
}


class PeakRSS:
    """Peak growth of the resident set while the block runs (sampled by a thread)."""

    def __init__(self, interval=0.002):
        self.interval, self.peak = interval, 0

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self.base, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", SIZES)
def test_k_occurrence(benchmark, n, d, contender):
    pytest.importorskip({"faiss-cpu": "faiss", "sklearn-brute": "sklearn"}.get(contender, "torch"))
    if contender in SMALL_ONLY and n > 20000:
        pytest.skip(f"{contender} takes ~50 s per call at n = {n}; measured at n = 20 000")
    x = _points(n, d)
    run = RUNNERS[contender]
    if contender == "fastnotes-numba":
        run(x[:2000], K)  # numba compile / cache load outside the timed region
    result = {}

    def timed():
        with PeakRSS() as rss:
            result["counts"] = run(x, K)
        result["peak"] = max(result.get("peak", 0), rss.peak)

    benchmark.group = f"{OP} cpu {n}x{d} k={K}"
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    counts = result["counts"]
    if contender == "faiss-cpu":
        _faiss_counts[(n, d)] = counts
    reference = _faiss_counts.get((n, d))
    assert counts.sum() == K * n
    benchmark.extra_info.update(
        op=OP, shape=[n, d], mode="fwd", contender=contender, device="cpu", **_env.device_info("cpu"),
        versions=_env.versions(), bytes=None, flops=2 * n * n * d, k=K, dtype="float32",  # compute-bound: no GB/s
        peak_rss_bytes=result["peak"],
        agree=None if reference is None else float((counts == reference).mean()),
    )
